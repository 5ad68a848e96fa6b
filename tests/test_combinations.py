"""Every model x prior x posterior (and each likelihood) trains a few steps on real Fashion-MNIST, writes finite
results, and every tool (vaelab-eval, vaelab-sample, vaelab-report) takes its checkpoint."""

import math

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from vaelab.cli.eval import run as eval_run
from vaelab.cli.report import report
from vaelab.cli.sample import run as sample_run

MODELS = ["vanilla", "deep", "conv", "conv_deep"]
PRIORS = ["standard", "vamp", "mog"]
POSTERIORS = ["gaussian", "iaf"]
CASES = [(m, p, q, "bernoulli") for m in MODELS for p in PRIORS for q in POSTERIORS]
CASES += [(m, "standard", "gaussian", "gaussian") for m in MODELS]
# the top-down ladder: its top layer a vector, so every prior and the flow act there; and a Gaussian likelihood
CASES += [("ladder", p, q, "bernoulli") for p, q in (("standard", "gaussian"), ("vamp", "gaussian"), ("mog", "iaf"))]
CASES += [("ladder", "standard", "gaussian", "gaussian")]
LADDER = ["model.width=8", "model.cell_width=4", "model.latent_channels=2", "model.encoder_blocks=[1,1,1]"]


def compose_tool(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("model,prior,posterior,likelihood", CASES, ids=["-".join(c) for c in CASES])
def test_every_combination_trains_tests_and_every_tool_takes_it(train_in_process, fashion_mnist, tmp_path, model,
                                                                 prior, posterior, likelihood):
    sizes = LADDER if model == "ladder" else ["model.hidden_dim=64", "model.latent_dim=8"]
    overrides = [f"model={model}", f"prior={prior}", f"posterior={posterior}", f"likelihood={likelihood}",
                 "logger=csv", "data.subset=200", "trainer.max_epochs=1", "eval.importance_samples=8",
                 *sizes, "callbacks.image_grids.num_samples=16", "extras.print_config=false"]
    overrides += {"vamp": ["prior.num_components=20"], "mog": ["prior.num_components=5"]}.get(prior, [])
    overrides += ["posterior.hidden_dim=32"] if posterior == "iaf" else []
    overrides += ["data.binarize=none"] if likelihood == "gaussian" else []
    out, results = train_in_process(*overrides)
    m = results["metrics"]
    assert (results["model"], results["prior"], results["posterior"], results["likelihood"]) == (
        model, prior, posterior, likelihood)
    for key in ("test/nll", "test/elbo", "test/kl", "test/recon", "test/bpd", "test/active_units"):
        assert math.isfinite(m[key]), (key, m)
    assert m["test/elbo"] <= -m["test/nll"] + 3 * m["test/nll_mc_se"] + 1.0  # the bound sits above the ELBO
    layers = {"deep": 2, "conv_deep": 2, "ladder": 7}.get(model, 1)
    assert ("test/kl_2" in m) == (layers > 1) and ("train/kl_2" in m) == (layers > 1)
    assert f"test/kl_{layers}" in m or layers == 1 and f"test/kl_{layers + 1}" not in m
    if layers > 1:
        assert m["test/kl"] == pytest.approx(sum(m[f"test/kl_{i}"] for i in range(1, layers + 1)), rel=1e-4)
        assert all(f"test/active_units_{i}" in m for i in range(1, layers + 1))
    closed_form = prior == "standard" and posterior == "gaussian"
    assert ("closed-form" in results["kl_estimator"]) == closed_form
    assert ("log-determinants" in results["kl_estimator"]) == (posterior == "iaf")
    grid = {"vamp": "pseudo_inputs_final.png", "mog": "prior_components_final.png"}.get(prior)
    if grid:
        assert (out / "samples" / grid).is_file()

    # every tool takes the checkpoint
    ckpt = out / "checkpoints" / "last.ckpt"
    evaluated = eval_run(compose_tool("eval", f"ckpt_path={ckpt}", "importance_samples=4", "subset=20",
                                      f"data_root={fashion_mnist}", f"output={tmp_path / 'eval.json'}"))
    assert evaluated["posterior"] == posterior and math.isfinite(evaluated["metrics"]["test/nll"])
    grids = sample_run(compose_tool("sample", f"ckpt_path={ckpt}", "num_samples=4", "num_reconstructions=4",
                                    f"data_root={fashion_mnist}", f"output_dir={tmp_path / 'grids'}"))
    assert grids["samples"].is_file() and ("prior_components" in grids) == (prior == "mog")
    (out / ".hydra").mkdir()  # what Hydra writes for a CLI run; this run was in-process
    OmegaConf.save(torch.load(ckpt, weights_only=True)["vaelab_config"], out / ".hydra" / "config.yaml")
    paths = report(out.parent, gmm=False)
    label = f"{model}+{prior}{'' if posterior == 'gaussian' else '+' + posterior} ({likelihood})"
    assert label in paths["report.md"].read_text()
