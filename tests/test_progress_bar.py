"""The progress bars: the default prints plain lines (every n batches, one per epoch with its metrics); the Rich
one is brought up to date every n batches; the app runs with the bar on and off."""

import lightning as L
import torch

from vaelab.training.callbacks import LineProgress, ThrottledProgressBar


class Counting(ThrottledProgressBar):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.updates: list[int] = []

    def _update_metrics(self, trainer, pl_module) -> None:
        self.updates.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)  # batches begun
        super()._update_metrics(trainer, pl_module)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, x, batch_idx):
        loss = self.layer(x).square().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_bar_updates_every_n_batches_and_at_the_end_of_the_epoch(tmp_path):
    bar = Counting(every_n_batches=4)
    data = torch.utils.data.DataLoader(torch.randn(10, 3), batch_size=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Tiny(), data)
    assert bar.updates == [4, 8, 10, 10]  # after batches 4, 8 and the last (10), and once at the epoch end


def test_line_progress_prints_every_n_batches_and_each_epoch_with_its_own_metrics(tmp_path, capsys):
    data = torch.utils.data.DataLoader(torch.randn(10, 3), batch_size=2)
    module = Tiny()
    trainer = L.Trainer(max_epochs=2, callbacks=[LineProgress(every_n_batches=2)], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")
    trainer.fit(module, data)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [
        "epoch 1/2: batch 2/5", "epoch 1/2: batch 4/5", lines[2].split(",")[0],
        "epoch 2/2: batch 2/5", "epoch 2/2: batch 4/5", lines[5].split(",")[0]]
    assert lines[2].startswith("epoch 1/2 done in ") and lines[5].startswith("epoch 2/2 done in ")
    assert "images/s" in lines[0]
    # each summary shows its own epoch's mean loss (the module logs it after the callbacks' epoch end)
    assert "train/loss" in lines[2]
    assert float(lines[5].split("train/loss ")[1]) == round(float(trainer.callback_metrics["train/loss"]), 2)


def test_the_app_runs_with_the_bar_on_and_off(train_in_process):
    """Every other in-process test runs with trainer.enable_progress_bar=false, which must drop the
    configured bar (Lightning refuses a bar callback with the bar disabled); this one keeps it."""
    _, results = train_in_process("trainer.enable_progress_bar=true", "trainer.max_epochs=1")
    assert results["status"] == "finished" and results["epochs"] == 1
