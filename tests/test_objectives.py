"""The training objectives (training/objective.py) and the one step (training/step.py): the IWAE bound against an
independent computation, its KL warm-up, its settings' errors, the same step solo and stacked (through vmap), the
gradient norm every path logs, and loss=iwae trained through the app with each model, prior, posterior and
likelihood, solo and stacked."""

from __future__ import annotations

import csv
import functools
import json
import math

import pytest
import torch
from conftest import TINY, compose, run_app
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal

from vaelab.errors import ConfigError
from vaelab.models.hvae import HierarchicalVAE
from vaelab.models.priors import VampPrior
from vaelab.models.vae import VAE
from vaelab.training.objective import Loss
from vaelab.training.step import StepStats, step_objective


def _vae(**kw) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 6, 6), latent_dim=3, hidden_dim=16, **kw)


def test_the_iwae_objective_is_the_log_mean_exp_of_weights_computed_by_hand():
    """Vanilla VAE, Bernoulli likelihood, N(0, I) prior: log w = log p(x|z) + log p(z) - log q(z|x), each from
    torch.distributions at z = mu + sigma * eps, then -mean_b log (1/k) sum_i w_i. The objective (loss.step) must
    equal it; with k=1 and a Monte Carlo KL it is the one-sample ELBO."""
    model = _vae()
    x = torch.rand(5, 1, 6, 6).round()
    k = 7
    noise = torch.randn(k, 5, 3)
    objective, terms = Loss(objective="iwae", samples=k).step(model, x, noise, 1.0)
    mu, logvar = model.encoder(x)
    z = mu + torch.exp(0.5 * logvar) * noise  # [k, B, D]
    logits = model.decoder(z)
    log_px = TorchBernoulli(logits=logits).log_prob(x.expand(k, *x.shape)).flatten(2).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_w = log_px + log_pz - log_qz
    by_hand = -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
    torch.testing.assert_close(objective, by_hand, rtol=1e-5, atol=1e-4)
    # the statistics: the ELBO's terms at the first sample
    torch.testing.assert_close(terms.recon, -log_px[0], rtol=1e-5, atol=1e-4)
    # the KL weight (warm-up) scales each sample's log p(z) - log q(z|x)
    warm, _ = Loss(objective="iwae", samples=k, warmup_epochs=2).step(model, x, noise, 0.25)
    torch.testing.assert_close(warm, -(torch.logsumexp(log_px + 0.25 * (log_pz - log_qz), 0) - math.log(k)).mean(),
                               rtol=1e-5, atol=1e-4)
    one, _ = Loss(objective="iwae", samples=1).step(model, x, noise[:1], 1.0)
    torch.testing.assert_close(one, -log_w[0].mean(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: _vae(),
    lambda: _vae(prior=functools.partial(VampPrior, num_components=4)),
    lambda: HierarchicalVAE((1, 6, 6), latent_dim=3, hidden_dim=16),
], ids=["vanilla", "vamp", "deep"])
def test_the_iwae_bound_is_tighter_than_the_elbo_on_average(make):
    """E[-IWAE_k] <= E[-ELBO], and the gap grows with k: over 400 draws per image, for every network."""
    model = make()
    x = torch.rand(4, 1, 6, 6).round()
    dim = sum(model.latent_dims)
    with torch.no_grad():
        elbo = torch.stack([Loss().step(model, x, torch.randn(4, dim), 1.0)[0] for _ in range(400)]).mean()
        iwae = {k: torch.stack([Loss(objective="iwae", samples=k).step(model, x, torch.randn(k, 4, dim), 1.0)[0]
                                for _ in range(400)]).mean() for k in (5, 50)}
    assert iwae[50] < iwae[5] < elbo


def test_each_wrong_loss_setting_is_one_sentence():
    with pytest.raises(ConfigError, match=r"^loss.objective must be one of elbo, iwae, got 'dreg'$"):
        Loss(objective="dreg")
    with pytest.raises(ConfigError, match=r"^loss.samples must be greater than 0, got 0$"):
        Loss(objective="iwae", samples=0)
    with pytest.raises(ConfigError, match=r"^loss.free_bits=0.5 floors each layer's KL, which loss.objective=iwae"):
        Loss(objective="iwae", samples=3, free_bits=0.5)
    with pytest.raises(ConfigError, match=r"^loss.samples=4 is the IWAE bound's k and loss.objective=elbo draws one"):
        Loss(samples=4)
    cfg = compose("loss=iwae")  # the preset: the default loss with the bound and its samples
    assert (cfg.loss.objective, cfg.loss.samples, cfg.loss.warmup_epochs) == ("iwae", 5, 10)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_stacked_step_is_the_solo_step_with_its_gradient_norm(objective):
    """Three members of one model through Stack.train_step (vmap over the one step function) against each
    member's solo step (step_objective, backward, clip_grad_norm_, Adam): the objectives and the gradient norms
    before clipping agree, and so do the weights after five steps."""
    from vaelab.stacking.stack import Stack, hyper_row

    loss = Loss(objective=objective, samples=1 if objective == "elbo" else 4)
    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(HierarchicalVAE((1, 6, 6), latent_dim=3, hidden_dim=16,
                                       prior=functools.partial(VampPrior, num_components=3)))
    stack = Stack(members[0], 3, "adam", loss)
    with torch.no_grad():
        for i, m in enumerate(members):
            for name, p in m.named_parameters():
                stack.params[name][i].copy_(p)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3 * (i + 1)) for i, m in enumerate(members)]
    clips = [None, 5.0, 0.5]
    free_bits = [0.0, 0.3, 0.0] if objective == "elbo" else [0.0] * 3
    weight = torch.tensor([0.5, 1.0, 0.2])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(3, 8, 1, 6, 6, generator=gen).round()
        noise = torch.randn(3, *loss.noise_shape(8, 6), generator=gen)
        solo = []
        for i, m in enumerate(members):
            member_loss = Loss(objective=objective, samples=loss.samples, free_bits=free_bits[i])
            value, _ = step_objective(m, x[i], noise[i], member_loss, float(weight[i]))
            opts[i].zero_grad()
            value.backward()
            params = list(m.parameters())
            norm = (torch.nn.utils.clip_grad_norm_(params, clips[i], foreach=True) if clips[i] else
                    torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
            opts[i].step()
            solo.append((value.item(), norm.item()))
        hyper = torch.tensor([hyper_row(o.param_groups[0], "adam", c) for o, c in zip(opts, clips)])
        stats = StepStats(stack.train_step(x, noise, weight, torch.tensor(free_bits), hyper,
                                           torch.ones(3, dtype=torch.bool)))
        assert stats.objective.tolist() == pytest.approx([s[0] for s in solo], rel=1e-5)
        assert stats.grad_norm.tolist() == pytest.approx([s[1] for s in solo], rel=1e-4)
    for i, m in enumerate(members):
        diffs = torch.cat([(stack.params[n][i] - p.detach()).abs().flatten() for n, p in m.named_parameters()])
        assert diffs.max() < 1e-4, (i, diffs.max())


def test_the_engine_reports_the_gradient_norm_before_clipping():
    from vaelab.training.engine import StepEngine

    model = _vae()
    params = list(model.parameters())
    x = torch.rand(1, 8, 1, 6, 6).round()

    def run(clip):
        torch.manual_seed(1)
        m = _vae()
        ps = list(m.parameters())
        engine = StepEngine(m, torch.optim.SGD(ps, lr=0.0), Loss(), images=lambda batch, i: batch[i], clip=clip and (
            lambda: torch.nn.utils.clip_grad_norm_(ps, clip, foreach=True)))
        stats = engine.run(x, 1, 0)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ps]))
        return float(stats.grad_norm[0]), float(after)

    free, free_after = run(None)
    clipped, clipped_after = run(0.5)
    assert free == pytest.approx(free_after, rel=1e-5) and free > 1.0  # unclipped: the gradient's own norm
    assert clipped == pytest.approx(free, rel=1e-5) and clipped_after == pytest.approx(0.5, rel=1e-4)
    assert params  # the model had parameters to measure


CASES = [
    ("vanilla", "standard", "gaussian", "bernoulli"),
    ("deep", "vamp", "iaf", "bernoulli"),
    ("conv", "mog", "gaussian", "discretized_logistic"),
    ("vanilla", "standard", "iaf", "dmol"),
]


@pytest.mark.parametrize("model,prior,posterior,likelihood", CASES, ids=["-".join(c) for c in CASES])
def test_loss_iwae_trains_with_each_model_prior_posterior_and_likelihood(train_in_process, model, prior, posterior,
                                                                         likelihood):
    overrides = [f"model={model}", f"prior={prior}", f"posterior={posterior}", f"likelihood={likelihood}",
                 "loss.objective=iwae", "loss.samples=3", "logger=csv", "data.subset=200", "trainer.max_epochs=2",
                 "eval.importance_samples=8", "model.hidden_dim=32", "model.latent_dim=6", "extras.print_config=false",
                 "callbacks.image_grids.num_samples=4", "trainer.steps_per_execution=1", "trainer.log_every_n_steps=1"]
    overrides += {"vamp": ["prior.num_components=10"], "mog": ["prior.num_components=5"]}.get(prior, [])
    overrides += ["posterior.hidden_dim=16"] if posterior == "iaf" else []
    overrides += ["data.binarize=none"] if likelihood != "bernoulli" else []  # the 8-bit images
    out, results = train_in_process(*overrides)
    m = results["metrics"]
    assert (results["objective"], results["objective_samples"]) == ("iwae", 3)
    assert all(math.isfinite(m[k]) for k in ("test/nll", "test/elbo", "train/loss", "train/grad_norm")), m
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    objective = [float(r["train_step/objective"]) for r in rows if r.get("train_step/objective")]
    norms = [float(r["train_step/grad_norm"]) for r in rows if r.get("train_step/grad_norm")]
    epochs = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(objective) == len(norms) > 3 and all(n > 0 for n in norms) and len(epochs) == 2
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[1] < losses[0]  # it learned
    first = [float(r["train_step/grad_norm"]) for r in rows if r.get("train_step/grad_norm") and r["epoch"] == "0"]
    assert epochs[0] == pytest.approx(sum(first) / len(first), rel=1e-5)  # an epoch's mean over its steps


def test_a_stacked_iwae_sweep_equals_its_solo_runs(tmp_path, fashion_mnist):
    common = ["-m", *TINY, "extras.print_config=false", "logger=csv", "loss=iwae", "loss.samples=3", "seed=1,2",
              "trainer.max_epochs=1", "data.subset=200", "model=deep", "prior=vamp", "prior.num_components=10"]
    runs = {}
    for name, extra in (("solo", []), ("stacked", ["hydra/launcher=stacked", "hydra.launcher.stack=true"])):
        proc = run_app(*common, *extra, f"hydra.sweep.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads((tmp_path / name / str(i) / "results.json").read_text())["metrics"] for i in range(2)]
    assert "2 jobs as one stacked model" in proc.stdout + proc.stderr
    for solo, stacked in zip(runs["solo"], runs["stacked"]):
        for key in ("train/loss", "train/grad_norm", "val/loss", "test/nll"):
            assert math.isclose(solo[key], stacked[key], rel_tol=1e-4), (key, solo[key], stacked[key])


def test_a_checkpoint_without_the_step_statistics_means_still_loads():
    """train/grad_norm's epoch sums are module state; a checkpoint saved without them loads (strictly) with empty
    sums, and its weights are the checkpoint's."""
    from vaelab.training.module import VAEModule

    saved = VAEModule(_vae()).state_dict()
    old = {k: v for k, v in saved.items() if not k.startswith("step_means.")}
    assert len(old) < len(saved)
    module = VAEModule(_vae())
    checkpoint = {"state_dict": dict(old)}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning loads it
    assert all(torch.equal(module.state_dict()[k], v) for k, v in old.items())
    assert float(module.step_means.count) == 0
