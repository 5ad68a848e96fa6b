"""hydra/launcher=stacked: a sweep's jobs trained as one stacked model are the same runs as the jobs trained alone
(every metric of results.json, to 1e-4 relative), in ordinary run directories whose checkpoints load as solo ones;
a stop signal to the launcher saves every member and resume=auto ends where the uninterrupted runs end; a member
that diverges is recorded as such while the others go on."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import wandb_files
from conftest import TINY, compose, fault, run_app

from hydra_plugins.vaelab_stacked_launcher._core import built_key, job_facts
from vaelab.cli.rundirs import sweep_id
from vaelab.stacking.plan import group_jobs, split
from vaelab.training.checkpoints import saved_entries

SWEEP = ["seed=1,2", "loss.beta=1,0.5"]  # four members: two seeds x two KL weights
COMMON = [*TINY, "extras.print_config=false"]
STACKED = ["hydra/launcher=stacked", "hydra.launcher.stack=true"]


def sweep(tmp: Path, *args: str, name: str = "sweep"):
    proc = run_app("-m", *COMMON, f"hydra.sweep.dir={tmp / name}", *args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp / name, proc


def members(sweep_dir: Path) -> dict[tuple, dict]:
    """results.json of every job, keyed by (seed, beta) as its own .hydra/config.yaml says."""
    import yaml

    out = {}
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        out[(cfg["seed"], cfg["loss"]["beta"])] = json.loads((job / "results.json").read_text())
    return out


def assert_same_runs(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        assert a["status"] == b["status"] == "finished", key
        assert (a["epochs"], a["global_step"]) == (b["epochs"], b["global_step"])
        figures = [k for k in b["metrics"] if not k.startswith("perf/")]
        assert figures and set(figures) <= set(a["metrics"])
        for k in figures:
            assert math.isclose(a["metrics"][k], b["metrics"][k], rel_tol=1e-4, abs_tol=1e-6), (key, k, a["metrics"][k],
                                                                                                b["metrics"][k])


def test_stacked_members_are_their_solo_runs_and_resume_to_them(tmp_path, fashion_mnist):
    solo, _ = sweep(tmp_path, *SWEEP, name="solo")  # Hydra's basic launcher: one job after another
    stacked, proc = sweep(tmp_path, *STACKED, *SWEEP, *fault("RecordProcess"), name="stacked")
    assert "4 jobs as one stacked model on cpu" in proc.stdout + proc.stderr
    want = members(solo)
    assert len(want) == 4
    assert_same_runs(members(stacked), want)
    # one process: each member a thread of the sweep's process, no member processes
    where = [json.loads(p.read_text()) for p in sorted(stacked.glob("*/where.json"))]
    assert len({w["pid"] for w in where}) == 1, where
    assert [w["thread"] for w in where] == [f"vaelab-member-{i}" for i in range(4)] and not any(
        w["children"] for w in where), where
    # the console: the stack's progress lines and one line per member as it ends, none of the members' own lines
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("[")]
    ended = [ln for ln in lines if ln.startswith("vaelab: #")]
    assert sorted(ln.split()[1] for ln in ended) == ["#0", "#1", "#2", "#3"], lines
    assert all("finished: test/nll " in ln and ", 2 epochs, " in ln and str(stacked) in ln for ln in ended), ended
    progress = [ln for ln in lines if ln.startswith("stacked: 4 of 4 members training, epoch ")]
    assert [ln.split(",")[1] for ln in progress] == [" epoch 1/2", " epoch 2/2"] and all(
        "img/s, ETA " in ln for ln in progress), lines
    assert len(lines) == len(ended) + len(progress), lines  # no member's start, epoch or summary lines
    train_log = (stacked / "0" / "train.log").read_text()  # each member's own lines are in its train.log
    assert "vaelab: vanilla / standard prior" in train_log and "  test/nll " in train_log

    # vaelab-report cannot tell the stacked sweep from the one run job after job
    from vaelab.cli.report import report

    tables = []
    for d in (solo, stacked):
        report(str(d), False, "vaelab", gmm=False)  # the app's own function, in this process
        rows = list(csv.DictReader((d / "report.csv").open()))
        tables.append({r["configuration"]: {k: v for k, v in r.items() if "time" not in k} for r in rows})
    assert len(tables[0]) == 2 and tables[0].keys() == tables[1].keys()  # two betas, each over two seeds
    for config, row in tables[0].items():
        for key, value in row.items():
            other = tables[1][config][key]
            try:
                assert math.isclose(float(value), float(other), rel_tol=1e-4, abs_tol=1e-6), (config, key)
            except ValueError:
                assert value == other, (config, key)

    # each member is an ordinary run directory; its checkpoint is its own and evaluates as a solo run's does
    key, results = next(iter(members(stacked).items()))
    job = Path(results["run_dir"])
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.ckpt", "metrics.csv", "train.log",
                 "samples/samples_final.png"):
        assert (job / name).is_file(), name
    runs = {}
    for member_dir in (Path(r["run_dir"]) for r in members(stacked).values()):  # one W&B run each, in one group
        (wandb_dir,) = (member_dir / "wandb").glob("offline-run-*")
        runs[wandb_files.run_info(wandb_dir)["id"]] = wandb_files.run_info(wandb_dir)["group"]
    assert len(runs) == 4 and set(runs.values()) == {f"sweep-{sweep_id(stacked)}"}  # its name and its path's hash
    overrides = (job / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={key[0]}" in overrides and "loss.beta=" in overrides and "hydra/launcher" not in overrides
    best = Path(results["best_checkpoint"])
    # one member's weights, not the stack's (which would be 4 times as large); paths in its config differ by a few bytes
    assert abs(best.stat().st_size - Path(want[key]["best_checkpoint"]).stat().st_size) < 4096
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vaelab.cli.eval import run as evaluate

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = hydra_compose("eval", overrides=[f"ckpt_path={best}", "importance_samples=32", "batch_size=200",
                                               f"output={tmp_path / 'eval.json'}", f"data_root={fashion_mnist}"])
    evaluated = evaluate(cfg)["metrics"]["test/nll"]  # vaelab-eval's own function, in this process
    assert math.isclose(evaluated, results["metrics"]["test/nll"], rel_tol=1e-5)

    # a stop signal to the launcher reaches every member (two here: seeds 1 and 2 at beta 0.5), each saves inside an
    # epoch (2 steps per execution; the solo runs took 8, which trains the same runs); resume=auto continues them
    stop = ["seed=1,2", "loss.beta=0.5", "trainer.steps_per_execution=2"]
    stopped, proc = sweep(tmp_path, *STACKED, *stop, *fault("SignalLauncherAt", step=5), name="stopped")
    said = proc.stdout + proc.stderr
    assert "stopped by SIGTERM" in said and "resume=auto" in said
    states = [json.loads(p.read_text()) for p in stopped.glob("*/results.json")]
    assert [r["status"] for r in states] == ["preempted"] * 2
    assert all(0 < r["global_step"] < 16 for r in states), states
    resumed, _ = sweep(tmp_path, *STACKED, *stop, *fault("SignalLauncherAt", step=100000), "resume=auto",
                       name="stopped")
    assert_same_runs(members(resumed), {k: v for k, v in want.items() if k[1] == 0.5})


def test_a_diverging_member_is_recorded_and_the_others_go_on(tmp_path, fashion_mnist):
    poison = fault("PoisonBatch", step="3,100000")  # a sweep over the step: member 0 diverges, member 1 never
    stacked = tmp_path / "sweep"
    proc = run_app("-m", *COMMON, *STACKED, "trainer.max_epochs=1", *poison, f"hydra.sweep.dir={stacked}", timeout=900)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # after member 1 ends
    assert errors[0].startswith("error: job #0: Training stopped: the loss became NaN") and "1 job of 2 failed (#0" in errors[1]
    results = [json.loads(p.read_text()) for p in sorted(stacked.glob("*/results.json"))]
    assert [r["status"] for r in results] == ["failed", "finished"]
    assert "not finite" in results[0]["error"] or "NaN" in results[0]["error"]
    assert math.isfinite(results[1]["metrics"]["test/nll"])


def test_a_member_with_a_bug_shows_its_traceback_and_the_others_finish(tmp_path, fashion_mnist):
    """A plain exception in a member (a bug, not one of vaelab's sentences) is caught by Hydra's run_job; the launcher
    reads it from the job's return (pins _core.job_error): its traceback and one line name it, the sweep exits 1."""
    proc = run_app("-m", *COMMON, *STACKED, "trainer.max_epochs=1", *fault("BugAt", step="3,100000"),
                   f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stderr.splitlines()
    assert "Traceback (most recent call last):" in lines
    assert "RuntimeError: a bug at step 3" in lines
    said = [line for line in proc.stdout.splitlines() if "stacked launcher: member 0" in line]  # Hydra's log
    assert len(said) == 1 and "(a bug at step 3)" in said[0] and "ended with an error" in said[0], said
    results = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")}
    assert results["1"]["status"] == "finished" and math.isfinite(results["1"]["metrics"]["test/nll"])


def test_jobs_group_by_the_keys_that_fix_shapes_and_code():
    configs = [compose(f"seed={s}", f"loss.beta={b}", f"optim.lr={lr}") for s, b, lr in
               [(1, 1.0, 5e-4), (2, 0.5, 1e-3), (3, 1.0, 5e-4)]]
    groups, notes = group_jobs([job_facts(c) for c in configs])  # the plan reads plain facts, not Hydra's configs
    assert [g.jobs for g in groups] == [[0, 1, 2]] and notes == []

    configs += [compose("model.latent_dim=20"), compose("optim._target_=torch.optim.SGD", "~optim.fused"),
                compose("model=deep", "prior=vamp")]
    groups, notes = group_jobs([job_facts(c) for c in configs])
    assert [g.jobs for g in groups] == [[0, 1, 2], [3], [4], [5]]
    assert groups[2].alone and "SGD" in groups[2].alone
    said = "\n".join(notes)
    assert "model differs between jobs (vanilla, deep)" in said and "prior differs between jobs (standard, vamp)" in said
    assert "model.latent_dim differs between jobs (40, 20)" in said and "job 4 runs alone" in said
    assert split(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # the objective and its samples fix the step's noise and code: the ELBO and two IWAE bounds, three stacks
    bounds = [compose(*o) for o in ([], ["loss=iwae"], ["loss=iwae", "loss.samples=9"], ["loss=iwae", "seed=7"])]
    groups, notes = group_jobs([job_facts(c) for c in bounds])
    assert [g.jobs for g in groups] == [[0], [1, 3], [2]], notes
    assert "loss.samples differs between jobs (1, 5, 9)" in "\n".join(notes), notes
    # the stabilisers are each member's own: jobs with and without them share a stack
    stabilised = [compose(*o) for o in ([], ["trainer.ema_rate=0.999"], ["trainer.gradient_skip_threshold=100"])]
    groups, notes = group_jobs([job_facts(c) for c in stabilised])
    assert [g.jobs for g in groups] == [[0, 1, 2]] and notes == []


def test_each_parallel_job_gets_its_gpu_and_its_share_of_the_cores(monkeypatch):
    """hydra/launcher=joblib: job i gets GPU i mod G and cores // n_jobs torch threads (here with 4 GPUs as torch
    reports them; the job's config is what Hydra composes for job 5 of the sweep)."""
    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from vaelab.cli.sweeps import use_job_share
    from vaelab.devices import cpu_cores, job_share

    assert job_share(5, parallel=4, cores=16, gpus=4) == (1, 4)
    assert job_share(2, parallel=3, cores=2, gpus=0) == (None, 1)
    assert job_share(0, parallel=1, cores=8, gpus=2) == (0, 8)

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 5
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    threads = torch.get_num_threads()
    try:
        use_job_share(cfg)
        assert list(cfg.trainer.devices) == [1]
        assert torch.get_num_threads() == max(1, cpu_cores() // 2)
    finally:
        torch.set_num_threads(threads)


def test_joblib_jobs_on_a_cpu_do_not_oversubscribe_it(tmp_path, fashion_mnist):
    """A real joblib sweep of two jobs at once: each job's results.json says it ran on the CPU with half the cores."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, app_env

    from vaelab.devices import cpu_cores

    env = app_env()
    env.pop("OMP_NUM_THREADS", None)  # torch's own default: every core, which two jobs at once would oversubscribe
    proc = subprocess.run([sys.executable, "-m", "vaelab.cli.train", "-m", *COMMON, "hydra/launcher=joblib",
                           "hydra.launcher.n_jobs=2", "trainer.max_epochs=1", "test=false", "logger=csv",
                           "seed=1,2", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert len(runs) == 2
    for run in runs:
        assert run["device"] == "cpu" and run["torch_threads"] == max(1, cpu_cores() // 2), run
    assert os.cpu_count()


@pytest.mark.parametrize("kind", ["adam", "adamw", "adam_normgrad"])
def test_a_stacked_step_is_each_members_solo_step(kind):
    """Three members with their own learning rate, weight decay, gradient clipping and free bits: five stacked steps
    give each member's objectives of five solo steps with torch's fused optimiser, and the same weights (but for the
    few whose gradient is at rounding level, where Adam's first steps move by +-lr either way)."""
    import functools

    import torch

    from vaelab.models.hvae import HierarchicalVAE
    from vaelab.models.priors import VampPrior
    from vaelab.stacking.stack import Stack, hyper_row
    from vaelab.training.objective import Loss
    from vaelab.training.optim import AdamNormGrad
    from vaelab.training.step import StepStats

    def make():
        return HierarchicalVAE((1, 12, 12), latent_dim=4, hidden_dim=32, prior=functools.partial(VampPrior,
                                                                                                  num_components=5))

    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(make())
    stack = Stack(members[0], 3, kind)
    with torch.no_grad():
        for i, m in enumerate(members):
            for name, p in m.named_parameters():
                stack.params[name][i].copy_(p)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adam_normgrad": AdamNormGrad}[kind]
    opts = [cls(m.parameters(), lr=1e-3 * (i + 1), weight_decay=0.01 * i, fused=True) for i, m in enumerate(members)]
    clips, losses = [None, 5.0, 0.5], [Loss(free_bits=fb) for fb in (0.0, 0.5, 0.0)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(3, 16, 1, 12, 12, generator=gen).bernoulli(generator=gen)
        noise = torch.randn(3, 16, 8, generator=gen)
        weight = torch.tensor([0.5, 1.0, 0.2])
        solo = []
        for i, m in enumerate(members):
            objective = losses[i](m(x[i], noise[i]), float(weight[i]))
            opts[i].zero_grad()
            objective.backward()
            if clips[i]:
                torch.nn.utils.clip_grad_norm_(list(m.parameters()), clips[i], foreach=True)
            opts[i].step()
            solo.append(objective.item())
        hyper = torch.tensor([hyper_row(o.param_groups[0], kind, c) for o, c in zip(opts, clips)])
        free_bits = torch.tensor([loss.free_bits for loss in losses])
        got = StepStats(stack.train_step(x, noise, weight, free_bits, hyper,
                                         torch.ones(3, dtype=torch.bool))).objective.tolist()
        assert got == pytest.approx(solo, rel=1e-5)
    for i, m in enumerate(members):
        diffs = torch.cat([(stack.params[n][i] - p.detach()).abs().flatten() for n, p in m.named_parameters()])
        assert diffs.median() < 1e-6 and (diffs > 1e-5).float().mean() < 0.01, (i, diffs.median(), diffs.max())


def test_members_left_out_or_diverged_keep_their_weights():
    import torch

    from vaelab.models.vae import VAE
    from vaelab.stacking.stack import Stack, hyper_row

    torch.manual_seed(0)
    stack = Stack(VAE((1, 8, 8), latent_dim=2, hidden_dim=16), 3, "adam")
    with torch.no_grad():
        for value in stack.params.values():
            value.normal_(0, 0.1)
    before = {k: v.clone() for k, v in stack.params.items()}
    x = torch.rand(3, 4, 1, 8, 8).bernoulli()
    x[1, 0, 0, 0, 0] = float("nan")  # member 1's batch is poisoned; member 2 takes no step
    hyper = torch.tensor([hyper_row({"lr": 1e-2}, "adam", None)] * 3)
    stack.train_step(x, torch.randn(3, 4, 2), torch.ones(3), torch.zeros(3), hyper, torch.tensor([True, True, False]))
    for name, value in stack.params.items():
        assert torch.equal(value[1], before[name][1]) and torch.equal(value[2], before[name][2]), name
    assert any(not torch.equal(v[0], before[n][0]) for n, v in stack.params.items())
    assert stack.step.tolist() == [1.0, 0.0, 0.0]


def test_a_wrong_launcher_setting_is_one_line_before_any_job(tmp_path, fashion_mnist):
    for setting, said in (("hydra.launcher.stack=maybe", "error: hydra.launcher.stack='maybe' is not one of auto, "
                                                         "true, false"),
                          ("hydra.launcher.max_members=0", "error: hydra.launcher.max_members=0 must be a whole number "
                                                           "of at least 1")):
        proc = run_app("-m", *COMMON, "hydra/launcher=stacked", setting, "seed=1,2", f"hydra.sweep.dir={tmp_path}")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [said]
        assert not list(tmp_path.glob("*/results.json"))


def test_a_stacked_sweep_in_its_default_directories_resumes_in_them(tmp_path, fashion_mnist):
    """No hydra.sweep.dir: the launcher's dated sweep directory is every member's, so a stop signal to the launcher
    followed by the same command with resume=auto continues the same member runs, in that one directory."""
    logs = tmp_path / "logs"
    stop = [*STACKED, "seed=1,2", "trainer.max_epochs=1", "test=false", "logger=csv", f"paths.log_dir={logs}",
            "trainer.steps_per_execution=2"]
    first = run_app("-m", *COMMON, *stop, *fault("SignalLauncherAt", step=3), timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (sweep_dir,) = (logs / "multirun").iterdir()  # one directory for the sweep, members included
    states = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    assert [r["status"] for r in states] == ["preempted"] * 2, states
    resumed = run_app("-m", *COMMON, *stop, *fault("SignalLauncherAt", step=3), "resume=auto", timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [p.name for p in (logs / "multirun").iterdir()] == [sweep_dir.name]
    done = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    assert [(r["status"], r["preemptions"], r["global_step"]) for r in done] == [("finished", 1, 8)] * 2, done


@pytest.fixture
def two_shapes(tmp_path, fashion_mnist):
    """Fashion-MNIST's first images as two .npz files: 28x28, and padded to 32x32. No config key tells them apart."""
    import numpy as np

    from vaelab.data import load_images

    train, test = load_images("fashion_mnist", fashion_mnist, download=False)
    np.savez(tmp_path / "a28.npz", train=train[:300, 0], test=test[:100, 0])
    pad = ((0, 0), (2, 2), (2, 2))
    np.savez(tmp_path / "b32.npz", train=np.pad(train[:300, 0], pad), test=np.pad(test[:100, 0], pad))
    return tmp_path / "a28.npz", tmp_path / "b32.npz"


def test_jobs_whose_built_models_differ_never_share_a_stack(tmp_path, two_shapes):
    """Grouping reads what each job builds (the data's image shape and the model's spec), not only config keys:
    two .npz files of 28x28 and 32x32 images are two stacks, said in one line, and the sweep finishes."""
    configs = [compose("data=arrays", f"data.path={p}") for p in two_shapes]
    built = [built_key(c) for c in configs]
    assert [b[0]["image_shape"] for b in built] == [[1, 28, 28], [1, 32, 32]] and [b[1] for b in built] == [None] * 2
    groups, notes = group_jobs([job_facts(c) for c in configs], built)
    assert [g.jobs for g in groups] == [[0], [1]]
    assert notes == ["stacked launcher: the data's image shape differs between jobs (1x28x28, 1x32x32): one stack "
                     "for each value"]
    # a job that cannot be built here (a missing file) runs alone, where its own run says what is wrong
    configs.append(compose("data=arrays", f"data.path={tmp_path / 'missing.npz'}"))
    groups, notes = group_jobs([job_facts(c) for c in configs], [*built, built_key(configs[-1])])
    assert groups[-1].jobs == [2] and "missing.npz is not a file" in groups[-1].alone

    proc = run_app("-m", *COMMON, *STACKED, "data=arrays", f"data.path={two_shapes[0]},{two_shapes[1]}",
                   "data.val_size=50", "trainer.max_epochs=1", "test=false", "logger=csv",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the data's image shape differs between jobs (1x28x28, 1x32x32)" in proc.stdout + proc.stderr
    results = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [(r["status"], r["num_parameters"]) for r in results] == [("finished", 1_116_864), ("finished", 1_333_104)]


def test_a_member_that_built_another_model_is_refused_in_one_sentence():
    """The group's own check, behind the grouping: a member whose model, image shape, batch or optimiser differs
    from its stack's is refused, naming both members and what differs, and never joins (no hang)."""
    from vaelab.stacking.group import StackGroup
    from vaelab.stacking.turns import StackError

    def built(shape, batch=50):
        spec = {"_target_": "vaelab.models.vae.VAE", "image_shape": shape}
        return {"spec": spec, "image shape": "x".join(map(str, shape)), "batch size": batch,
                "steps per execution": 1, "optimizer": "adam"}

    group = StackGroup(["member 0 (a)", "member 1 (b)"])
    assert group._refusal(0, built([1, 28, 28])) is None
    said = group._refusal(1, built([1, 32, 32], batch=100))
    assert said.startswith("member 1 (b) cannot join the stack of member 0 (a): its image shape, batch size, model "
                           "differ (image shape 1x32x32 against 1x28x28; batch size 100 against 50)"), said
    assert group._refusal(1, built([1, 28, 28])) is None
    from vaelab.training.objective import Loss

    iwae = {**built([1, 28, 28]), "loss": Loss(objective="iwae", samples=5)}  # another bound: other noise shapes
    assert "its objective differ (objective iwae (k=5) against elbo (k=1))" in group._refusal(1, iwae)
    with pytest.raises(StackError, match="cannot join the stack"):
        group.register(1, built([1, 32, 32]), {}, None)
    assert not group.members[1].joined and group.stack is None


def test_a_killed_sweep_resumes_its_members(tmp_path, fashion_mnist):
    """SIGKILL to the stacked sweep's one process mid-training: nothing is left running (no member processes) and
    nothing is printed after the kill; each member's checkpoints stay whole, and resume=auto finishes them with
    the uninterrupted sweep's metrics.csv rows and W&B history, each in one W&B run, its training time kept."""
    from test_stop_anywhere import assert_rows_close, rows

    args = ["-m", *COMMON, *STACKED, "seed=1,2", "trainer.max_epochs=2", "logger=many"]
    whole = run_app(*args, f"hydra.sweep.dir={tmp_path / 'whole'}", timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = run_app(*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", *fault("SignalLauncherAt", step=10, signum=signal.SIGKILL),
                   timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    # a member may not have reached its first checkpoint yet (it then begins again, in the same W&B run)
    saved_time = [saved_entries(tmp_path / "sweep" / str(i) / "checkpoints" / "last.ckpt",
                                "vaelab_train_time_s").get("vaelab_train_time_s", 0.0) for i in range(2)]
    resumed = run_app(*args, "resume=auto", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [(r["status"], r["global_step"]) for r in done] == [("finished", 16)] * 2
    assert all(r["train_time_s"] >= round(t, 2) and r["train_time_s"] > 0 for r, t in zip(done, saved_time)), saved_time
    assert max(saved_time) > 0  # the kill came after a checkpoint of at least one member
    for i in range(2):
        member, ref = tmp_path / "sweep" / str(i), tmp_path / "whole" / str(i)
        assert_rows_close(rows(member), rows(ref))
        logs = sorted((member / "wandb").glob("offline-run-*"))
        assert len(logs) in (1, 2) and len({wandb_files.run_info(d)["id"] for d in logs}) == 1  # its starts, one run
        assert len(logs) == 2 or saved_time[i] == 0
        history = [r for d in logs for r in wandb_files.history(d)]
        (ref_log,) = (ref / "wandb").glob("offline-run-*")
        assert [sorted(k for k in r if not k.startswith("_")) for r in history] == [
            sorted(k for k in r if not k.startswith("_")) for r in wandb_files.history(ref_log)]
        assert [r["epoch"] for r in history if "train/loss" in r] == [0, 1]


def test_a_member_that_holds_up_its_stack_is_named_and_stopped(tmp_path, fashion_mnist):
    """A member that neither steps nor leaves for hydra.launcher.member_timeout seconds while the other waits is
    named in one line and stopped as SIGTERM would stop it: it saves and stops (preempted), and the other finishes."""
    proc = run_app("-m", *COMMON, *STACKED, "seed=1,2", "trainer.max_epochs=1", "test=false", "logger=csv",
                   "trainer.steps_per_execution=1", "hydra.launcher.member_timeout=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   *fault("StallAt", step=3, seconds=120), timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "neither asked for a step" in ln]
    assert len(said) == 1 and f"member 1 ({tmp_path / 'sweep' / '1'})" in said[0] and "SIGTERM" in said[0], said
    done = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["status"] for r in done] == ["finished", "preempted"] and done[1]["global_step"] == 4, done


def test_a_stacked_step_dispatches_the_same_ops_at_any_n_and_never_syncs_the_host():
    """The whole stacked step (vmapped forward and backward, clipping, Adam over flat [N, total] buffers, masks for
    members that take no step) dispatches a number of torch ops that does not grow with N, and none that reads a
    value back to the host (aten._local_scalar_dense: .item(), .tolist(), a Python branch on a tensor)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from vaelab.models.vae import VAE
    from vaelab.stacking.stack import Stack, hyper_row

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = {}
    for n, kind in ((2, "adam"), (6, "adam"), (2, "adam_normgrad"), (6, "adam_normgrad")):
        stack = Stack(VAE((1, 8, 8), latent_dim=2, hidden_dim=16), n, kind)
        hyper = torch.tensor([hyper_row({"lr": 1e-3}, kind, 1.0)] * n)
        active = torch.arange(n) % 2 == 0  # half the members take no step
        stack.train_step(torch.rand(n, 4, 1, 8, 8).bernoulli(), torch.randn(n, 4, 2), torch.ones(n), torch.zeros(n),
                         hyper, active)
        with Ops() as ops:
            stack.train_step(torch.rand(n, 4, 1, 8, 8).bernoulli(), torch.randn(n, 4, 2), torch.ones(n),
                             torch.zeros(n), hyper, active)
        assert not [o for o in ops.names if "_local_scalar_dense" in o], (n, kind)
        counts[n, kind] = len(ops.names)
    assert counts[2, "adam"] == counts[6, "adam"] and counts[2, "adam_normgrad"] == counts[6, "adam_normgrad"], counts


def test_a_stacked_evaluation_is_each_members_own():
    """Validation and test are stacked too: one vmapped pass over the members' weights gives each member the
    metrics its own EvalMetrics.update gives (the ELBO at the noise it draws, active units, the importance-sampled
    NLL at its common random numbers)."""
    import functools

    import torch

    from vaelab.evaluation.metrics import EvalMetrics
    from vaelab.models.hvae import HierarchicalVAE
    from vaelab.models.priors import VampPrior
    from vaelab.stacking.group import StackGroup
    from vaelab.stacking.turns import EvalRequest

    models = []
    for i in range(3):
        torch.manual_seed(i)
        models.append(HierarchicalVAE((1, 12, 12), latent_dim=4, hidden_dim=32,
                                      prior=functools.partial(VampPrior, num_components=5)))
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0)).bernoulli()
    index = torch.arange(100, 116)

    def metrics():
        return EvalMetrics(models[0].latent_dims, models[0].num_pixels, importance_samples=20, points_per_pass=32,
                           seed=3)  # 2 samples per decoder pass: 10 chunks

    solo, stacked, requests = [], [], []
    for i, m in enumerate(models):
        torch.manual_seed(10 + i)
        own = metrics()
        own.update(m, x, index)
        solo.append({k: float(v) for k, v in own.compute("test").items()})
        torch.manual_seed(10 + i)  # the same generator state: the member draws what update draws
        mine = metrics()
        chunks = mine.importance_noise(16, index, x.device)
        assert len(chunks) == 10
        requests.append(EvalRequest(m, {n: p.detach() for n, p in m.named_parameters()}, x, m.draw_noise(16), chunks))
        stacked.append(mine)
    StackGroup(["a", "b", "c"])._evaluate(requests)  # one vmapped pass for all three
    for mine, request, want in zip(stacked, requests, solo):
        mine.record(*request.result)
        got = {k: float(v) for k, v in mine.compute("test").items()}
        assert got.keys() == want.keys() and len({want["test/nll"] for want in solo}) == 3
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key


def test_every_gpu_of_a_node_gets_a_process_of_its_own():
    """With G visible GPUs a sweep's stacks spread over G processes, each given its one GPU (CUDA_VISIBLE_DEVICES)
    and cores // G threads, the largest stacks first to the least loaded; on a CPU or one GPU, one process."""
    from vaelab.errors import ConfigError
    from vaelab.stacking.plan import Unit, plan, process_count

    units = [Unit([0, 1, 2], True, "cuda"), Unit([3, 4], True, "cuda"), Unit([5], False, "cuda"),
             Unit([6, 7, 8, 9], True, "cuda")]
    assert process_count("auto", units, gpus=8) == 4 and process_count("auto", units, gpus=2) == 2
    assert process_count("auto", units, gpus=1) == 1 and process_count("auto", units[:1], gpus=8) == 1
    assert process_count("auto", [Unit([0, 1], True, "cpu")] * 3, gpus=0) == 1  # a CPU: this process
    specs = plan(units, 2, cores=16)
    assert [s["units"] for s in specs] == [[2, 3], [0, 1]]  # 4 members, then 3, 2 and 1: 4 + 1 and 3 + 2 per GPU
    assert [s["env"] for s in specs] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert [s["threads"] for s in specs] == [8, 8]
    assert plan([Unit([0, 1], True, "cpu")] * 2, 2, cores=2)[1] == {"units": [1], "env": {}, "threads": 1}
    with pytest.raises(ConfigError, match="hydra.launcher.processes=0 must be auto or a whole number"):
        process_count(0, units, gpus=2)


def test_stacks_spread_over_processes_each_with_its_share(tmp_path, fashion_mnist):
    """hydra.launcher.processes=2 on this CPU: two stacks (batch sizes 50 and 40, two seeds each) train in two
    processes at once, each a stack of two member threads with one of the two cores, and finish as runs."""
    proc = run_app("-m", *COMMON, *STACKED, "seed=1,2", "data.batch_size=50,40", "trainer.max_epochs=1", "test=false",
                   "logger=csv", "hydra.launcher.processes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   *fault("RecordProcess"), timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    import yaml

    where = {}
    for job in sorted((tmp_path / "sweep").iterdir()):
        if (job / "where.json").is_file():
            cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
            where[(cfg["data"]["batch_size"], cfg["seed"])] = json.loads((job / "where.json").read_text())
            assert json.loads((job / "results.json").read_text())["status"] == "finished"
    assert len(where) == 4
    pids = {b: {w["pid"] for (bb, _), w in where.items() if bb == b} for b in (50, 40)}
    assert all(len(p) == 1 for p in pids.values()) and pids[50] != pids[40], where  # a process per stack
    assert all(w["threads"] == 1 and w["thread"].startswith("vaelab-member-") for w in where.values()), where
    assert (proc.stdout + proc.stderr).count("with 1 threads") == 2


def test_scheduled_members_follow_their_own_schedules_without_a_warning(tmp_path, fashion_mnist):
    """Each member's schedule steps its own rate, which the stacked step reads; the stack's optimiser step counts as
    the member's for torch's schedulers (stack_member.py sets what only an optimiser's own step sets), so no
    "lr_scheduler.step() before optimizer.step()" warning shows."""
    stacked, proc = sweep(tmp_path, *STACKED, "scheduler=exponential", "scheduler.gamma=0.5,0.25", "logger=csv",
                          "test=false")
    assert "2 jobs as one stacked model on cpu" in proc.stdout + proc.stderr
    assert "lr_scheduler.step()" not in proc.stdout + proc.stderr
    rates = []
    for job in ("0", "1"):
        with open(stacked / job / "metrics.csv") as f:
            rates.append([float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")])
    assert rates[0] == pytest.approx([5e-4, 2.5e-4]) and rates[1] == pytest.approx([5e-4, 1.25e-4])


LADDER = ["model=ladder", "model.width=8", "model.cell_width=4", "model.latent_channels=2",
          "model.encoder_blocks=[1,1,1]"]


def test_a_ladder_sweep_stacks_and_each_member_is_its_solo_run(tmp_path, fashion_mnist):
    """model=ladder through vmap: its convolutions, spatial latents and top-down pass, stacked, are each member's solo
    run to 1e-4 (every metric of results.json), with the KL per layer of all seven layers; with an EMA of the
    weights, which the stack keeps for each member and the member validates, tests and checkpoints."""
    args = [*LADDER, "seed=1,2", "trainer.max_epochs=1", "trainer.ema_rate=0.9", "data.subset=200",
            "eval.importance_samples=8"]
    solo, _ = sweep(tmp_path, *args, name="solo")
    stacked, proc = sweep(tmp_path, *STACKED, *args, name="stacked")
    assert "2 jobs as one stacked model on cpu" in proc.stdout + proc.stderr
    want = members(solo)
    assert len(want) == 2 and all("test/kl_7" in r["metrics"] for r in want.values())
    assert_same_runs(members(stacked), want)


def test_a_stacked_ladder_step_is_each_members_solo_step_and_skips_and_averages_as_it_does():
    """Three ladder members, one whose threshold skips every update and one whose threshold skips none, two with a
    moving average of their weights: five stacked steps give each member's solo objectives, weights and average
    (stabilisers.apply_unless_skipped and WeightAverage), and the skipped member's weights and Adam state never
    move."""
    import torch

    from vaelab.models import LadderVAE
    from vaelab.stacking.stack import Stack, hyper_row
    from vaelab.training.stabilisers import WeightAverage, apply_unless_skipped
    from vaelab.training.step import StepStats, grad_norm

    def make():
        return LadderVAE((1, 12, 12), resolutions=[6, 3, 1], latent_layers=[1, 1, 1], encoder_blocks=[1, 1, 1],
                         width=8, cell_width=4, latent_channels=2)

    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(make())
    start = [p.detach().clone() for p in members[1].parameters()]
    rates = [0.9, 0.0, 0.5]
    averages = [WeightAverage(m, r) if r else None for m, r in zip(members, rates)]
    stack = Stack(members[0], 3, "adam")
    stack.add_average()
    with torch.no_grad():
        for i, m in enumerate(members):
            for name, p in m.named_parameters():
                stack.params[name][i].copy_(p)
                stack.ema[name][i].copy_(p)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in members]
    skips = [None, 1e-6, 1e9]
    gen = torch.Generator().manual_seed(0)
    dim = sum(members[0].latent_dims)
    skipped = []
    for _ in range(5):
        x = torch.rand(3, 8, 1, 12, 12, generator=gen).bernoulli(generator=gen)
        noise = torch.randn(3, 8, dim, generator=gen)
        weight = torch.tensor([1.0, 0.5, 1.0])
        solo = []
        for i, m in enumerate(members):
            terms = m(x[i], noise[i])
            objective = terms.recon.mean() + weight[i] * terms.kl_layers.mean(1).sum()
            opts[i].zero_grad()
            objective.backward()
            norm = grad_norm(list(m.parameters()))
            skip = torch.tensor(False) if skips[i] is None else (norm > skips[i])

            def step(i=i):
                opts[i].step()
                if averages[i] is not None:
                    averages[i].update()

            apply_unless_skipped(step, skip, opts[i], list(m.parameters()), averages[i])
            solo.append(objective.item())
        hyper = torch.tensor([hyper_row(o.param_groups[0], "adam", None, s, r) for o, s, r in zip(opts, skips, rates)])
        got = StepStats(stack.train_step(x, noise, weight, torch.zeros(3), hyper, torch.ones(3, dtype=torch.bool)))
        assert got.objective.tolist() == pytest.approx(solo, rel=1e-4)
        skipped.append(got.skipped_steps.tolist())
    assert skipped == [[0.0, 1.0, 0.0]] * 5
    for i, m in enumerate(members):
        diffs = torch.cat([(stack.params[n][i] - p.detach()).abs().flatten() for n, p in m.named_parameters()])
        assert diffs.max() < 1e-4, (i, diffs.max())
        if averages[i] is not None:
            avg = dict(averages[i].model.named_parameters())
            diffs = torch.cat([(stack.ema[n][i] - avg[n]).abs().flatten() for n in stack.names])
            moved = torch.cat([(stack.ema[n][i] - stack.params[n][i]).abs().flatten() for n in stack.names])
            assert diffs.max() < 1e-5 and moved.max() > 1e-4, (i, diffs.max(), moved.max())  # an average, not a copy
    assert all(torch.equal(a, stack.params[n][1]) for a, n in zip(start, stack.names))  # the skipped member
    assert float(stack.step[1]) == 0 and float(stack.step[0]) == 5
