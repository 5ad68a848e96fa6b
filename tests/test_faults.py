"""Faults cost nothing already computed: preemption and resume, a NaN loss, broken checkpoints, bad configs,
and no secret written anywhere. Real processes and signals, no mocks."""

import json

import pytest
import torch
from conftest import TINY, fault, run_app

from vaelab.training.checkpoints import load_checkpoint


@pytest.mark.parametrize("every", ["null", "5"])  # checked every step, or (as on a GPU) every 5 steps
def test_a_nan_loss_stops_with_one_sentence_and_leaves_the_last_good_checkpoint(train_run, every):
    run_dir, _, proc = train_run(*fault("PoisonBatch", step=12),
                                 "trainer.max_epochs=3", f"eval.check_finite_every_n_steps={every}", expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    # a NaN pixel reaches both terms through the encoder
    assert "NaN or infinite in the reconstruction term and KL term at step 12 (epoch 1)" in line and "optim.lr" in line
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # saved after epoch 1, untouched since
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "results.json").exists() or json.loads((run_dir / "results.json").read_text())["status"] != "finished"


def test_resuming_from_a_broken_or_foreign_checkpoint_fails_clearly(train_run, tmp_path):
    run_dir, res, _ = train_run("trainer.max_epochs=1", "logger=csv")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:3000])
    base = [*TINY, "logger=csv", f"hydra.run.dir={tmp_path / 'again'}"]
    proc = run_app(*base, f"ckpt_path={broken}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {broken} is not a readable checkpoint" in proc.stderr
    proc = run_app(*base, "model=deep", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "is from another model" in proc.stderr
    # nothing already saved was touched
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == res["global_step"]


BAD = [  # (override, words the one-line error must contain)
    ("model.latent_dim=-3", "model.latent_dim must be greater than 0, got -3"),
    ("model.latent_dim=0", "model.latent_dim must be greater than 0"),
    ("model.latent_dim=abc", "model.latent_dim must be an integer, got 'abc'"),
    ("model.latent_dim=2.5", "model.latent_dim must be an integer"),
    ("model.hidden_dim=0", "model.hidden_dim must be greater than 0"),
    ("model.network=transformer", "model.network must be one of mlp, conv"),
    ("model=deep model.num_layers=0", "model.num_layers must be greater than 0"),
    ("eval.importance_samples=0", "eval.importance_samples must be greater than 0"),
    ("eval.importance_samples=-10", "eval.importance_samples must be greater than 0"),
    ("prior=vamp prior.num_components=0", "prior.num_components must be greater than 0"),
    ("prior=vamp prior.init=zeros", "prior.init must be one of random, data"),
    ("data.batch_size=0", "data.batch_size must be greater than 0"),
    ("data.batch_size=100000", "data.batch_size=100000 is larger than the 400 training images"),
    ("data.binarize=sometimes", "data.binarize must be one of none, static, dynamic"),
    ("data.subset=-5", "data.subset must be greater than 0"),
    ("data.val_size=70000", "data.val_size=70000 leaves no training images"),
    ("likelihood=gaussian", "likelihood=gaussian does not fit binarised data"),
    ("likelihood=gaussian data.binarize=none likelihood.variance=wobbly", "likelihood.variance must be one of"),
    ("likelihood=gaussian data.binarize=none likelihood.sigma=-1", "likelihood.sigma must be greater than 0"),
    ("optim.lr=0", "optim.lr must be greater than 0"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("optim.fused=sometimes", "optim.fused must be one of True, False, got 'sometimes'"),
    ("loss.beta=-1", "loss.beta must be at least 0"),
    ("loss.beta=nan", "loss.beta must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("model.hidden_dim=1000000000", "the model is too large for this machine's memory (model.hidden_dim=1000000000"),
    ("trainer.steps_per_execution=0", "trainer.steps_per_execution must be at least 1, got 0"),
    ("cuda_graphs=maybe", "cuda_graphs must be one of auto, True, False, got 'maybe'"),
    ("loss.warmup_epochs=-2", "loss.warmup_epochs must be at least 0"),
    ("loss.free_bits=-0.5", "loss.free_bits must be at least 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be at least 1"),
    ("trainer.precision=13-bogus", "Lightning rejected the trainer config"),
    ("logger.wandb.mode=sometimes", "logger.wandb.mode must be one of auto, online, offline, disabled"),
    ("resume=yes", "resume must be one of null, auto"),
    ("seed=-1", "seed must be at least 0"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_values_are_caught_before_training(train_in_process, overrides, expected):
    from vaelab.errors import VaelabError

    with pytest.raises(VaelabError) as err:
        train_in_process(*overrides.split())
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_the_cli_prints_one_line_for_a_bad_value_and_leaves_hydras_own_errors_alone(tmp_path, fashion_mnist):
    proc = run_app(*TINY, f"hydra.run.dir={tmp_path}", "optim.lr=-1")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: optim.lr must be greater than 0, got -1"
    assert "Traceback" not in proc.stderr
    proc = run_app(*TINY, f"hydra.run.dir={tmp_path}", "model=nonexistent")
    assert proc.returncode == 1 and "Could not find 'model/nonexistent'" in proc.stderr


def test_the_wandb_api_key_is_written_nowhere(train_run, monkeypatch):
    secret = "vaelab-test-secret-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    import conftest

    original = conftest.app_env
    monkeypatch.setattr(conftest, "app_env", lambda: {**original(), "WANDB_API_KEY": secret})
    run_dir, _, _ = train_run("trainer.max_epochs=1")
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_a_one_image_data_set_trains_and_draws_its_grids(train_run):
    run_dir, res, _ = train_run("data.subset=1", "data.batch_size=1", "trainer.max_epochs=1")
    assert res["status"] == "finished"
    names = {p.name for p in (run_dir / "samples").iterdir()}
    assert {"samples_final.png", "reconstructions_final.png", "traversals_final.png"} <= names
    assert not any(n.startswith("interpolations") for n in names)  # one image: nothing to interpolate between


def test_vaelab_eval_refuses_an_override_it_would_ignore(train_run):
    run_dir, _, _ = train_run("trainer.max_epochs=1", "logger=csv")
    proc = run_app("+model=deep", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "importance_samples=4",
                   module="vaelab.cli.eval")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: vaelab-eval rebuilds the model, prior, likelihood and data from the checkpoint's own config, "
        "so model is not among its options")
