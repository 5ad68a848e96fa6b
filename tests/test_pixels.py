"""Likelihoods for 8-bit images and the bits/dim the field compares: what pixel values each likelihood is given
(vaelab/pixels.py) and what its test/nll and test/bpd then are, checked on real runs: the bits/dim recomputed
independently, never below zero whatever the likelihood, a stacked dmol member equal to its solo run, and the
tools (vaelab-eval, -sample, -report) on a discrete likelihood's checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, run_app

RUN = [*TINY, "data.binarize=none", "data.subset=100", "trainer.max_epochs=1", "eval.importance_samples=64",
       "logger=csv", "extras.print_config=false"]


def independent_nll(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """-log p(x) per image by importance sampling with q(z|x), written out here with torch.distributions (not the
    model's log_importance_weights, nor vaelab's metrics): [B]."""
    mu, logvar = model.encoder(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((k,))  # [K, B, D]
    params = model.decoder(z.flatten(0, 1)).unflatten(0, (k, len(x)))
    log_w = (model.likelihood.log_prob(x, params) + torch.distributions.Normal(0, 1).log_prob(z).sum(-1)
             - q.log_prob(z).sum(-1))
    return -(torch.logsumexp(log_w, 0) - math.log(k))


@pytest.mark.parametrize("likelihood,pixels", [("dmol", "8-bit"), ("gaussian", "dequantized")])
def test_a_runs_test_bpd_is_minus_log2_p_over_d_of_the_8_bit_images(train_in_process, fashion_mnist, likelihood, pixels):
    from vaelab import load_model
    from vaelab.data import load_images

    out, results = train_in_process(*RUN, f"likelihood={likelihood}")
    assert results["pixels"] == pixels and "8-bit images" in results["bpd_means"]
    model = load_model(results["best_checkpoint"])
    images = torch.from_numpy(np.ascontiguousarray(load_images("fashion_mnist", fashion_mnist, False)[1][:100]))
    x = images.float() / 255  # the 8-bit test images, k/255
    d = x[0].numel()
    if pixels == "dequantized":  # as the run saw them: (k + u) / 256, u fixed by the data's seed for the test set
        x = (images.float() + torch.rand(x.shape, generator=torch.Generator().manual_seed(3))) / 256
    torch.manual_seed(0)
    with torch.no_grad():
        nll = independent_nll(model, x, 64).double().mean().item()
    if pixels == "dequantized":  # a density on [0, 1]^D: + D ln 256 bounds the 8-bit images' NLL
        nll += d * math.log(256)
    bpd = nll / (d * math.log(2))
    # two importance-sampled estimates at K = 64, with other draws: equal within their noise (3e-4 relative here;
    # a missing D ln 256 would be 4,347 nats, a bits/dim of the wrong D or base off by far more)
    assert results["metrics"]["test/nll"] == pytest.approx(nll, rel=3e-4)
    assert results["metrics"]["test/bpd"] == pytest.approx(bpd, rel=3e-4)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian likelihood.variance=per_pixel", "continuous_bernoulli",
                                        "discretized_logistic", "dmol", "discretized_gaussian",
                                        "discretized_gaussian likelihood.variance=per_pixel", "bernoulli"])
def test_no_bits_per_dim_below_zero_on_8_bit_images_whatever_the_likelihood(train_in_process, likelihood):
    name, *extra = likelihood.split()
    _, results = train_in_process(*RUN, f"likelihood={name}", *extra, "trainer.max_epochs=2")
    metrics = results["metrics"]
    if name == "bernoulli":  # BCE on grey pixels is no likelihood: no bits/dim, and it says so
        assert results["pixels"] == "grey" and "test/bpd" not in metrics and "no bits/dim" in results["bpd_means"]
        return
    assert results["pixels"] in ("8-bit", "dequantized") and metrics["test/bpd"] > 0, (likelihood, metrics)
    assert metrics["test/nll"] > 0


def test_a_stacked_dmol_member_equals_its_solo_run(tmp_path, fashion_mnist):
    args = ["-m", *RUN, "likelihood=dmol", "likelihood.num_mixtures=3", "seed=1,2", "eval.importance_samples=16"]
    solo = run_app(*args, f"hydra.sweep.dir={tmp_path / 'solo'}", timeout=600)
    stacked = run_app(*args, "hydra/launcher=stacked", "hydra.launcher.stack=true",
                      f"hydra.sweep.dir={tmp_path / 'stacked'}", timeout=600)
    assert solo.returncode == 0 and stacked.returncode == 0, solo.stderr[-2000:] + stacked.stderr[-3000:]
    assert "2 jobs as one stacked model" in stacked.stdout + stacked.stderr
    for job in ("0", "1"):
        a, b = (json.loads((tmp_path / kind / job / "results.json").read_text()) for kind in ("solo", "stacked"))
        assert a["pixels"] == b["pixels"] == "8-bit"
        for key, value in a["metrics"].items():
            if not key.startswith("perf/"):
                assert math.isclose(b["metrics"][key], value, rel_tol=1e-4, abs_tol=1e-4), (job, key, value,
                                                                                        b["metrics"][key])


def test_the_tools_say_which_figure_is_which_for_a_discrete_likelihood(train_run, tmp_path):
    run_dir, results, _ = train_run(*RUN[len(TINY):], "likelihood=discretized_logistic", "data.subset=1000",
                                    "trainer.max_epochs=2")  # 40 steps: the scales begin at the whole pixel range
    ckpt = results["best_checkpoint"]
    evaluated = run_app(f"ckpt_path={ckpt}", "importance_samples=64", f"output={tmp_path / 'eval.json'}",
                        module="vaelab.cli.eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    said = json.loads((tmp_path / "eval.json").read_text())
    assert said["pixels"] == "8-bit" and said["metrics"]["test/bpd"] == pytest.approx(results["metrics"]["test/bpd"],
                                                                                       rel=1e-5)
    assert "  pixels             8-bit: bits/dim of the 8-bit images (a discrete likelihood: exact)" in evaluated.stdout
    sampled = run_app(f"ckpt_path={ckpt}", "num_samples=16", f"output_dir={tmp_path / 'samples'}",
                      module="vaelab.cli.sample")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    from PIL import Image

    (png,) = (tmp_path / "samples").glob("samples*.png")
    pixels = np.asarray(Image.open(png))
    assert pixels.std() > 2  # drawn images, not a blank grid (still grey-ish: 40 steps)
    report = run_app(str(run_dir.parent), "--no-gmm", module="vaelab.cli.report")
    assert report.returncode == 0, report.stderr[-3000:]
    table = (run_dir.parent / "report.md").read_text()
    assert "| pixels |" in table and "| 8-bit |" in table and "8-bit: bits/dim of the 8-bit images" in table


@pytest.mark.parametrize("combo", ["model=deep likelihood=dmol", "model=conv likelihood=discretized_logistic prior=vamp",
                                   "model=conv_deep likelihood=discretized_gaussian_per_pixel posterior=iaf",
                                   "model=deep likelihood=continuous_bernoulli prior=mog"])
def test_the_new_likelihoods_compose_with_every_network_prior_and_posterior(train_in_process, combo):
    _, results = train_in_process(*RUN, *combo.split(), "eval.importance_samples=8")
    assert results["status"] == "finished" and results["metrics"]["test/bpd"] > 0
    assert results["pixels"] == ("dequantized" if "continuous" in combo else "8-bit")
