"""Shared fixtures: the real data (or a clear skip), and ways to run the real app with small overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("VAELAB_DATA_DIR", ROOT / "data"))
sys.path.insert(0, str(Path(__file__).parent))

# Small, fast, real: a subset of Fashion-MNIST, few epochs, few importance samples, W&B offline.
TINY = [
    "data.subset=400", "data.batch_size=50", "data.eval_batch_size=200", "trainer.max_epochs=2",
    "eval.importance_samples=32", "trainer.enable_progress_bar=false", "callbacks.image_grids.every_n_epochs=1",
    "loss.warmup_epochs=1", "trainer.log_every_n_steps=2",
]


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The data root holding Fashion-MNIST (made available by `make data`); never downloads."""
    from vaelab.data import load_images
    from vaelab.errors import DataError

    try:
        load_images("fashion_mnist", DATA_DIR, download=False)
    except DataError as exc:
        if os.environ.get("VAELAB_REQUIRE_DATA"):
            pytest.fail(str(exc))
        pytest.skip(f"{exc} (run `make data`)")
    return DATA_DIR


if os.environ.get("PYTEST_XDIST_WORKER"):  # two test workers on two cores: one torch thread each, no oversubscription
    import torch

    torch.set_num_threads(1)


def app_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0",
               PYTHONUNBUFFERED="1", VAELAB_DATA_DIR=str(DATA_DIR),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    env.pop("WANDB_API_KEY", None)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_app(*args: str, module: str = "vaelab.cli.train", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, in a subprocess, from the repo root."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=app_env(),
                          capture_output=True, text=True, timeout=timeout)


def fault(kind: str, name: str = "fault", **args) -> list[str]:
    """The overrides that add tests/fault_callbacks.py's `kind` to a run as callbacks.<name>, with its arguments
    (signals by number): fault("SignalAt", step=10, signum=signal.SIGTERM)."""
    values = {k: int(v) if isinstance(v, signal.Signals) else v for k, v in args.items()}
    return [f"+callbacks.{name}._target_=fault_callbacks.{kind}", *(f"+callbacks.{name}.{k}={v}" for k, v in values.items())]


def run_ok(*args: str, **kw) -> subprocess.CompletedProcess:
    """run_app, which must end with exit status 0 (else the test fails showing the output's tails)."""
    proc = run_app(*args, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def stopped_then_resumed(*args: str, fault_args: list[str], between=None, fault_on_resume: bool = True, **kw):
    """The shape of a fault run: the app stopped by a fault (it saves, says how to continue and exits 0), then the
    same command with resume=auto (`between()` runs in between). The resume keeps the fault, as a user repeats the
    command, unless fault_on_resume=False (a fault that would fire again where the resume passes). Returns both
    processes."""
    stopped = run_ok(*args, *fault_args, **kw)
    assert "resume=auto" in stopped.stdout + stopped.stderr, stopped.stdout[-3000:]
    if between is not None:
        between()
    return stopped, run_ok(*args, *(fault_args if fault_on_resume else []), "resume=auto", **kw)


@pytest.fixture
def train_run(tmp_path, fashion_mnist):
    """Train with TINY overrides (plus any given) into a fresh run directory; return (dir, results)."""

    def _run(*overrides: str, expect_ok: bool = True):
        run_dir = tmp_path / "run"
        proc = run_app(*TINY, f"hydra.run.dir={run_dir}", *overrides)
        if expect_ok:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            return run_dir, json.loads((run_dir / "results.json").read_text()), proc
        return run_dir, None, proc

    return _run


def compose(*overrides: str):
    """The app's config, composed in-process as `vaelab-train` would (for fast parametrised runs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def train_in_process(tmp_path, fashion_mnist, monkeypatch):
    """Run vaelab.cli.train.train() in this process on composed config; returns results (results.json)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def _run(*overrides: str):
        cfg = compose(*TINY, f"paths.output_dir={tmp_path / 'run'}", f"data.root={fashion_mnist}", *overrides)
        out = Path(cfg.paths.output_dir)
        from vaelab.cli.train import train

        results = train(cfg)
        assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
        return out, results

    return _run


def pytest_collection_modifyitems(config, items) -> None:
    """`slow`: every test that trains or reads the real data set (the fashion_mnist fixture, which train_run and
    train_in_process use too). `pytest -m "not slow"` is then the quick loop of unit tests; `make test` runs all."""
    for item in items:
        if "fashion_mnist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
