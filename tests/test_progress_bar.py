"""The default progress bar is brought up to date every n training batches, and the app runs with it."""

import lightning as L
import torch

from vaelab.callbacks import ThrottledProgressBar


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
        return self.layer(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_bar_updates_every_n_batches_and_at_the_end_of_the_epoch(tmp_path):
    bar = Counting(every_n_batches=4)
    data = torch.utils.data.DataLoader(torch.randn(10, 3), batch_size=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Tiny(), data)
    assert bar.updates == [4, 8, 10, 10]  # after batches 4, 8 and the last (10), and once at the epoch end


def test_the_app_runs_with_the_bar_on_and_off(train_in_process):
    """Every other in-process test runs with trainer.enable_progress_bar=false, which must drop the
    configured bar (Lightning refuses a bar callback with the bar disabled); this one keeps it."""
    _, results = train_in_process("trainer.enable_progress_bar=true", "trainer.max_epochs=1")
    assert results["status"] == "finished" and results["epochs"] == 1
