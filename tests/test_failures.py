"""Every other failure a user can provoke ends in one line (or a clean fallback): W&B online without a network,
the report and sample tools on bad input, a broken run beside the one to resume, an argument a class does not
take, a refused start. Real processes, a real socket that never answers; nothing mocked."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time

import pytest
from conftest import TINY, fault, run_app, stopped_then_resumed


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_mnist):
    run_dir = tmp_path_factory.mktemp("good") / "runs" / "good"
    proc = run_app(*TINY, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def silent_server():
    """A local server that takes connections and never answers (as a W&B host behind a dead network path)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_wandb_online_without_an_answer_falls_back_to_offline_in_one_line(tmp_path, fashion_mnist, silent_server,
                                                                        monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "app_env", _with(conftest.app_env, WANDB_MODE="online", WANDB_API_KEY="x" * 40,
                                                   WANDB_BASE_URL=silent_server))
    t0 = time.perf_counter()
    proc = run_app(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", "logger.wandb.network_timeout=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    said = [ln for ln in proc.stdout.splitlines() if "did not answer within 1 s" in ln]
    assert len(said) == 1 and "W&B logs offline" in said[0] and "wandb sync" in said[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["wandb"]["mode"] == "offline"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_wandb_mode_online_without_an_answer_is_one_error_and_leaves_no_run_directory(tmp_path, fashion_mnist,
                                                                                    silent_server, monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "app_env", _with(conftest.app_env, WANDB_MODE="online", WANDB_API_KEY="x" * 40,
                                                   WANDB_BASE_URL=silent_server))
    proc = run_app(*TINY, f"hydra.run.dir={tmp_path / 'run'}", "logger.wandb.mode=online",
                   "logger.wandb.network_timeout=1")
    assert proc.returncode == 1
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
    assert errors == [f"error: logger.wandb.mode=online, but the W&B server {silent_server} did not answer within 1 s; "
                      "log offline with logger.wandb.mode=offline and upload later with wandb sync, or raise "
                      "logger.wandb.network_timeout"], errors
    assert not (tmp_path / "run").exists()


def _with(app_env, **extra):
    return lambda: {**app_env(), **extra}


def test_the_report_skips_broken_runs_in_one_line_each_and_writes_the_rest_whole(tmp_path, finished_run):
    root = tmp_path / "runs"
    shutil.copytree(finished_run, root / "good")
    broken = {
        "bad_yaml": lambda d: (d / ".hydra" / "config.yaml").write_text("model: [unclosed\n"),
        "binary_results": lambda d: (d / "results.json").write_bytes(b"\x89PNG\x00\xff\xfe"),
        "list_results": lambda d: (d / "results.json").write_text("[1, 2, 3]"),
        "no_model": lambda d: (d / ".hydra" / "config.yaml").write_text("seed: 1\n"),
        "bad_csv": lambda d: (d / "metrics.csv").write_text("epoch,val/elbo\nzero,abc\n"),
    }
    for name, breaks in broken.items():
        shutil.copytree(finished_run, root / name)
        breaks(root / name)
    proc = run_app(str(root), module="vaelab.cli.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaelab-report: skipped ")]
    assert sorted(ln.split()[2].rstrip(":").rsplit("/", 1)[1] for ln in skipped) == sorted(broken), proc.stderr
    assert "Traceback" not in proc.stderr
    report = (root / "report.md").read_text()
    assert "| vanilla+standard (bernoulli) | 1/1 |" in report
    assert {p.name for p in root.iterdir() if p.is_file()} == {"report.md", "report.csv", "runs.csv", "curves.png",
                                                                "nll.png", "samples.png", "report.html"}  # no temporary file


@pytest.mark.parametrize("override,expected", [
    ("num_samples=0", "error: num_samples must be at least 1, got 0"),
    ("num_samples=-3", "error: num_samples must be at least 1, got -3"),
    ("num_samples=1000000000", "error: num_samples must be at most 4096, got 1000000000"),
    ("num_reconstructions=0", "error: num_reconstructions must be at least 1, got 0"),
    ("steps=0", "error: steps must be at least 2, got 0"),
])
def test_vaelab_sample_checks_its_counts(finished_run, tmp_path, override, expected):
    proc = run_app(f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}", override,
                   f"output_dir={tmp_path}", module="vaelab.cli.sample")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [expected], proc.stderr[-2000:]


def test_a_malformed_overrides_file_elsewhere_does_not_stop_resume(tmp_path, fashion_mnist):
    logs = tmp_path / "outputs"
    args = [*TINY, "logger=csv", f"paths.log_dir={logs}"]
    other = logs / "train" / "0000-broken"
    found = []

    def break_another():  # another run directory beside the stopped one, with unreadable files
        found.extend((logs / "train").iterdir())
        (other / ".hydra").mkdir(parents=True)
        (other / ".hydra" / "overrides.yaml").write_text("- [unclosed\n  : :\n")
        (other / "checkpoints").mkdir()
        (other / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")

    _, resumed = stopped_then_resumed(*args, fault_args=fault("SignalAt", step=10, signum=signal.SIGTERM),
                                      between=break_another)
    (run_dir,) = found
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    warned = [ln for ln in resumed.stderr.splitlines() if "skipped" in ln]
    assert warned and str(other / ".hydra" / "overrides.yaml") in warned[0] and "Traceback" not in resumed.stderr


def test_an_argument_the_class_does_not_take_is_one_line_before_anything_is_written(tmp_path, fashion_mnist):
    proc = run_app(*TINY, f"hydra.run.dir={tmp_path / 'run'}", "+model.foo=1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model has no argument foo (its arguments: latent_dim, "), lines
    assert not (tmp_path / "run").exists()
    proc = run_app(*TINY, f"hydra.run.dir={tmp_path / 'run'}", "+optim.momentumm=0.9")
    assert proc.stderr.strip().startswith("error: optim has no argument momentumm (its arguments: lr, ")


def test_a_refused_start_says_it_once_and_leaves_no_run_directory(tmp_path, fashion_mnist, monkeypatch):
    import conftest

    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setattr(conftest, "app_env", _with(conftest.app_env, VAELAB_DATA_DIR=str(empty)))
    proc = run_app(*TINY, "data=mnist", "data.download=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "MNIST was not found" in ln]
    assert len(said) == 1 and said[0].startswith("error: "), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[ERROR]" not in proc.stdout
    assert not (tmp_path / "run").exists()


def test_a_hung_wandb_at_the_end_is_one_line_not_a_hang(tmp_path, fashion_mnist):
    t0 = time.perf_counter()
    proc = run_app(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", "logger.wandb.finish_timeout=3",
                   *fault("FreezeWandbAtTestEnd"), timeout=240)
    assert proc.returncode == 0 and "froze wandb-core" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = [ln for ln in proc.stdout.splitlines() if "W&B did not finish within 3 s" in ln]
    assert len(said) == 1 and "wandb sync" in said[0] and time.perf_counter() - t0 < 120
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"
