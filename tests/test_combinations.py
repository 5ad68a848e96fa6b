"""Every model x prior x likelihood trains a few steps on real Fashion-MNIST and writes finite results."""

import math

import pytest

MODELS = ["vanilla", "deep", "conv", "conv_deep"]
PRIORS = ["standard", "vamp"]
LIKELIHOODS = ["bernoulli", "gaussian"]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("model", MODELS)
def test_every_combination_trains_and_tests(train_in_process, model, prior, likelihood):
    overrides = [f"model={model}", f"prior={prior}", f"likelihood={likelihood}", "logger=csv",
                 "data.subset=200", "trainer.max_epochs=1", "eval.importance_samples=8",
                 "model.hidden_dim=64", "model.latent_dim=8", "prior.num_components=20" if prior == "vamp" else "",
                 "callbacks.image_grids.num_samples=16"]
    if likelihood == "gaussian":
        overrides.append("data.binarize=none")
    out, results = train_in_process(*[o for o in overrides if o])
    m = results["metrics"]
    assert results["model"] == model and results["prior"] == prior and results["likelihood"] == likelihood
    for key in ("test/nll", "test/elbo", "test/kl", "test/recon", "test/bpd", "test/active_units"):
        assert math.isfinite(m[key]), (key, m)
    layers = 2 if "deep" in model else 1
    assert ("test/kl_2" in m) == (layers == 2) and ("train/kl_2" in m) == (layers == 2)
    if layers == 2:
        assert m["test/kl"] == pytest.approx(m["test/kl_1"] + m["test/kl_2"], rel=1e-4)
        assert "test/active_units_1" in m and "test/active_units_2" in m
    assert "Monte Carlo" in results["kl_estimator"] if prior == "vamp" else "closed-form" in results["kl_estimator"]
    if prior == "vamp":
        assert (out / "samples" / "pseudo_inputs_final.png").is_file()
