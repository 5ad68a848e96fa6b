"""The comparison workflow on real data: a tiny `experiment=compare` sweep, then vaelab-report,
vaelab-eval and vaelab-sample on what it wrote."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import wandb_files
from conftest import TINY, run_app

from vaelab.cli.rundirs import sweep_id
from vaelab.errors import CheckpointError
from vaelab.models import VAE, HierarchicalVAE
from vaelab.training.checkpoints import load_weights

# prior.num_components cannot be overridden for the standard prior, so the VampPrior keeps K=500 here
SWEEP = [*TINY, "trainer.max_epochs=1", "data.subset=300", "model.hidden_dim=64", "logger.wandb.log_model=true"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fashion_mnist):
    root = tmp_path_factory.mktemp("compare") / "sweep"
    # no -m: a preset that is a sweep runs as one (hydra.mode=MULTIRUN in the preset)
    proc = run_app("experiment=compare", *SWEEP, f"hydra.sweep.dir={root}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _results(root):
    return {d.name: json.loads((d / "results.json").read_text()) for d in sorted(root.iterdir())
            if (d / "results.json").is_file()}


def test_compare_runs_four_models_grouped_and_tagged_in_wandb(sweep):
    results = _results(sweep)
    assert sorted((r["model"], r["prior"]) for r in results.values()) == [
        ("deep", "standard"), ("deep", "vamp"), ("vanilla", "standard"), ("vanilla", "vamp")]
    infos = [wandb_files.run_info(r["wandb"]["dir"]) for r in results.values()]
    assert len({i["group"] for i in infos}) == 1 and infos[0]["group"] == f"compare-{sweep_id(sweep)}"
    assert {i["job_type"] for i in infos} == {"compare"}
    assert len({i["id"] for i in infos}) == 4  # one W&B run per job, each ended before the next
    for info, r in zip(infos, results.values()):
        assert {r["model"], f"prior:{r['prior']}", "lik:bernoulli"} <= set(info["tags"])
    # log_model offline: the checkpoints are in the offline run as a model artifact, for `wandb sync`
    arts = wandb_files.artifacts(next(iter(results.values()))["wandb"]["dir"])
    assert arts and arts[0]["type"] == "model" and any(f.endswith(".ckpt") for f in arts[0]["files"])


def test_report_table_matches_results_and_draws_both_figures(sweep, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(sweep, root)
    (root / "3" / "results.json").unlink()  # a crashed run leaves no results.json
    proc = run_app(str(root), "--wandb", "--no-gmm", module="vaelab.cli.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_run,) = (root / "wandb").glob("offline-run-*")
    assert wandb_files.run_info(report_run)["job_type"] == "report"
    # into the runs' own W&B group (results.json), not one named after the folder the report was given
    assert wandb_files.run_info(report_run)["group"] == f"compare-{sweep_id(sweep)}" != f"compare-{sweep_id(root)}"
    logged = {k for row in wandb_files.history(report_run) for k in row}
    assert {"report/table/_type", "report/curves/_type", "report/samples/_type"} <= logged
    results = _results(root)
    rows = list(csv.DictReader(open(root / "runs.csv")))
    assert len(rows) == 4
    by_dir = {r["run_dir"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_dir["3"]["status"] == "failed" and "no results.json" in by_dir["3"]["error"]
    for name, res in results.items():
        row = by_dir[name]
        assert row["status"] == "finished"
        for key in ("test/nll", "test/elbo", "test/kl", "test/active_units"):
            assert float(row[key]) == pytest.approx(res["metrics"][key], rel=1e-9)
    per_config = list(csv.DictReader(open(root / "report.csv")))
    assert len(per_config) == 4 and sum(int(r["finished"]) for r in per_config) == 3
    md = (root / "report.md").read_text()
    assert "Failed runs:" in md and "| configuration |" in md
    # each finished run linked to its W&B run: id, group, and (offline) its directory with the wandb sync line
    links = md.split("W&B runs:\n")[1].split("\n\n")[0].splitlines()
    assert len(links) == 3, links
    for name, res in results.items():
        w = res["wandb"]
        (line,) = [ln for ln in links if ln.startswith(f"- `{root / name}` ")]
        assert line.endswith(f": W&B run {w['id']}, group compare-{sweep_id(sweep)}: offline: {w['dir']} (upload: "
                             f"wandb sync {w['dir']})"), line
        assert Path(w["dir"]).name.endswith(w["id"]) and w["mode"] == "offline" and w["url"] is None
    for name in ("curves.png", "samples.png"):
        assert (root / name).stat().st_size > 10_000


def test_eval_reproduces_the_runs_test_nll(sweep, tmp_path):
    res = _results(sweep)["0"]
    evals = {}
    for seed in (0, 7):  # importance_seed 0 is what training used; 7 draws other samples
        out = tmp_path / f"eval{seed}.json"
        proc = run_app(f"ckpt_path={res['best_checkpoint']}", "importance_samples=32", f"output={out}",
                       f"importance_seed={seed}", "batch_size=77", module="vaelab.cli.eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals[seed] = json.loads(out.read_text())
    assert evals[0]["num_images"] == 300 and evals[0]["importance_samples"] == 32
    t = res["metrics"]
    # the same importance samples per image (common random numbers), in other batches: the same estimate
    assert evals[0]["metrics"]["test/nll"] == pytest.approx(t["test/nll"], rel=1e-5)
    # other samples: a different estimate, within its Monte Carlo error
    m = evals[7]["metrics"]
    se = math.hypot(m["test/nll_mc_se"], t["test/nll_mc_se"])
    assert m["test/nll"] != t["test/nll"] and abs(m["test/nll"] - t["test/nll"]) < 4 * se
    assert m["test/active_units"] == t["test/active_units"]  # deterministic given the weights


def test_sample_writes_every_grid(sweep, tmp_path):
    res = _results(sweep)["1"]  # vanilla + VampPrior
    proc = run_app(f"ckpt_path={res['best_checkpoint']}", f"output_dir={tmp_path}", "num_samples=16",
                   module="vaelab.cli.sample")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("samples", "reconstructions", "interpolations", "traversals", "pseudo_inputs"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name


def test_broken_and_foreign_checkpoints_fail_clearly(sweep, tmp_path):
    res = _results(sweep)["0"]
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(open(res["best_checkpoint"], "rb").read()[:5000])
    proc = run_app(f"ckpt_path={broken}", module="vaelab.cli.eval")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {broken} is not a readable checkpoint")
    vanilla, deep = VAE((1, 28, 28), hidden_dim=16), HierarchicalVAE((1, 28, 28), hidden_dim=16)
    before = vanilla.state_dict()["encoder.head.mu.weight"].clone()
    with pytest.raises(CheckpointError, match="is from another model"):
        load_weights(vanilla, deep.state_dict(), "deep.ckpt")
    torch.testing.assert_close(vanilla.state_dict()["encoder.head.mu.weight"], before)  # nothing half-loaded


def test_a_bad_configuration_in_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, fashion_mnist):
    root = tmp_path / "sweep"
    proc = run_app("-m", "model.latent_dim=3,-1", *TINY, "trainer.max_epochs=1", "logger=csv",
                   f"hydra.sweep.dir={root}")
    assert proc.returncode == 1, proc.stderr[-3000:]  # once the other job has finished, naming the failed one
    assert proc.stderr.splitlines()[-1].startswith("error: 1 job of 2 failed (#1"), proc.stderr[-3000:]
    ok, bad = (json.loads((root / str(i) / "results.json").read_text()) for i in (0, 1))
    assert ok["status"] == "finished" and bad["status"] == "failed"
    assert "model.latent_dim must be greater than 0, got -1" in bad["error"]


def _chromium() -> str:
    import os

    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("VAELAB_REQUIRE_DATA"):  # CI: `make test` installs it (make browser), so this is a failure
            pytest.fail("no chromium: `make browser` installs Debian's chromium (as root with apt)")
        pytest.skip("no chromium (make browser installs Debian's)")
    return found


def test_the_report_page_opens_in_a_real_browser(sweep, tmp_path):
    """report.html from the one-epoch sweep, opened by headless chromium: no console errors, every image decoded
    (naturalWidth > 0), nothing fetched from the network, and a screenshot that is not blank."""
    import subprocess

    import matplotlib.pyplot as plt

    from vaelab.cli.report import report

    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    paths = report(root)
    page = paths["report.html"].read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained, offline
    assert page.count('src="data:image/png;base64,') >= 2 + 4 * 3  # NLL, curves, each model's three grids
    assert page.count("<b>GMM samples</b>") == 4  # drawn by the report for every configuration
    assert "(nll.png)" in paths["report.md"].read_text() and "(report.html)" in paths["report.md"].read_text()
    assert page.count("wandb sync ") == 4 and "<h2>W&amp;B runs</h2>" in page  # each run linked to its W&B run
    # the table's columns, and a header saying when, by which command and version, and what differs
    assert all(f"<th>{h}</th>" in page for h in ("MC s.e.", "parameters", "epochs", "train time (s)"))
    from vaelab import __version__

    assert f"by vaelab {__version__}, from\n<code>vaelab-train -m experiment=compare " in page
    differ = page.split("Config keys that differ between the configurations: ")[1].split("</p>")[0]
    assert "<code>model._target_</code>" in differ and "<code>prior._target_</code>" in differ, differ
    assert "<code>seed</code>" not in differ and "paths." not in differ
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    # a wrapper page reads the report's images from its frame (file:// pages of one folder may, with the flag)
    (root / "check.html").write_text(
        '<iframe id="f" src="report.html" width="1400" height="900"></iframe><pre id="out">pending</pre><script>'
        'document.getElementById("f").onload = () => { const d = document.getElementById("f").contentDocument;'
        'document.getElementById("out").textContent = JSON.stringify([...d.images].map('
        'i => [i.alt, i.complete, i.naturalWidth])); };</script>')
    dom = subprocess.run([*browser, "--dump-dom", (root / "check.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    images = json.loads(dom.stdout.split('<pre id="out">')[1].split("</pre>")[0].replace("&quot;", '"'))
    assert len(images) >= 10 and all(done and width > 0 for _, done, width in images), images
    shot = tmp_path / "report.png"
    run = subprocess.run([*browser, "--enable-logging=stderr", "--v=0", "--window-size=1400,2600",
                          f"--screenshot={shot}", paths["report.html"].as_uri()], capture_output=True, text=True,
                         timeout=120)
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line]
    assert run.returncode == 0 and not console, console or run.stderr[-2000:]
    pixels = plt.imread(shot)
    assert pixels.shape[0] == 2600 and pixels.std() > 0.05  # a page, not a blank screen
    shutil.copy(shot, root / "report_screenshot.png")


def test_gmm_sampler_draws_where_the_codes_are_and_the_page_shows_it(sweep, tmp_path):
    """vaelab-sample sampler=gmm on the deep VampPrior run: a mixture over the training codes, its samples beside the
    prior's in the report page, and the test codes' log-likelihood, checked against torch.distributions."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

    from vaelab.cli.report import report
    from vaelab.cli.sample import run as sample
    from vaelab.evaluation.latents import embed
    from vaelab.evaluation.samplers import GMMSampler
    from vaelab.training.checkpoints import load_model

    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    (run,) = [d for d, r in _results(root).items() if (r["model"], r["prior"]) == ("deep", "vamp")]
    ckpt = root / run / "checkpoints" / "last.ckpt"
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = hydra_compose("sample", overrides=[f"ckpt_path={ckpt}", "sampler=gmm", "gmm_components=3",
                                                 "num_samples=16", "num_reconstructions=8"])
    paths = sample(cfg)
    import matplotlib.pyplot as plt

    grid = plt.imread(paths["gmm_samples"])
    assert grid.shape[:2] == (2 + 2 * 30, 2 + 8 * 30) and grid.std() > 0.01  # 16 images, 8 a row, not blank
    saved = json.loads(paths["gmm"].read_text())
    assert saved["components"] == 3 and math.isfinite(saved["test_log_likelihood_per_code"])
    assert "GMM samples" in report(root)["report.html"].read_text()

    model = load_model(ckpt)
    images = torch.rand(300, 1, 28, 28).bernoulli()  # the maths of the score, on any codes
    sampler = GMMSampler(model, components=3, seed=0).fit(images[:200])
    got = sampler.log_likelihood(images[200:])
    gmm = sampler.gmm
    mixture = MixtureSameFamily(Categorical(torch.as_tensor(gmm.weights_)),
                                MultivariateNormal(torch.as_tensor(gmm.means_), torch.as_tensor(gmm.covariances_)))
    codes = embed(model, images[200:]).double()
    assert got["gmm"] == pytest.approx(float(mixture.log_prob(codes).mean()), rel=1e-6)
    assert got["prior"] == pytest.approx(float(model.prior.log_prob(codes.float()).mean()), rel=1e-5)
    assert sampler.sample(5).shape == (5, 1, 28, 28)


def test_the_curves_legend_fits_its_figure():
    """Four configurations of two seeds each, named as experiment=compare names them: the figure's one legend has
    ink (it is drawn) and nothing touches the image's left or right edge (a legend wider than the figure was cut
    off at both ends on the page)."""
    import io

    import matplotlib.pyplot as plt

    from vaelab.reporting.figures import curves_figure
    from vaelab.reporting.runs import Run

    runs = []
    for i, label in enumerate(f"{m}+{p} (bernoulli)" for m in ("vanilla", "deep") for p in ("standard", "vamp")):
        for seed in (1, 2):
            curves = {f"{split}/{key}": [(e, 100.0 - 10 * e + i + seed) for e in range(1, 5)]
                      for split in ("train", "val") for key in ("elbo", "recon", "kl")}
            runs.append(Run(Path(f"/runs/{i}{seed}"), label, seed, "finished", curves=curves))
    pixels = plt.imread(io.BytesIO(curves_figure(runs)))[..., :3]
    ink = pixels.min(axis=2) < 0.5  # dark pixels: text and lines
    band = ink[int(0.9 * ink.shape[0]):]  # the legend's rows, below the lower axes' labels
    assert band.any(), "no legend drawn"
    assert not ink[:, :3].any() and not ink[:, -3:].any(), "something is cut off at the figure's edge"


def test_the_nll_figure_keeps_a_configurations_seeds_beside_its_bar():
    """One configuration of two seeds: its seed dots stand beside its bar, in the middle of the axes, not at their
    left edge (autoscaling spread one configuration's few hundredths of a unit over the whole width)."""
    import io

    import matplotlib.pyplot as plt

    from vaelab.reporting.figures import nll_figure
    from vaelab.reporting.runs import Run

    label = "vanilla+standard (bernoulli)"
    runs = [Run(Path(f"/runs/{seed}"), label, seed, "finished",
                results={"metrics": {"test/nll": nll, "test/nll_mc_se": 0.01}}) for seed, nll in ((1, 346.5), (2, 352.2))]
    pixels = plt.imread(io.BytesIO(nll_figure([{"configuration": label}], runs)))[..., :3]
    dark = pixels.max(axis=2) < 0.3  # black: the frame, text and the seeds' dots
    frame = [c for c in range(dark.shape[1]) if dark[:, c].sum() > 0.5 * dark.shape[0]]  # the axes' two sides
    left, right = frame[0], frame[-1]
    rows = [r for r in range(dark.shape[0]) if dark[r, left:right].sum() > 0.9 * (right - left)]  # top and bottom
    inside = dark[rows[0] + 3:rows[-1] - 2, left + 3:right - 2]
    width = inside.shape[1]
    dark_columns = inside.any(axis=0)  # the dots, and the legend's text (placed where no data is: the right)
    assert not dark_columns[:int(0.3 * width)].any(), "a seed's dot at the axes' left edge, away from its bar"
    assert dark_columns[int(0.3 * width):int(0.5 * width)].any(), "no seed drawn beside the bar"
