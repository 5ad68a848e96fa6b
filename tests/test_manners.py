"""The library's manners, as a user coming from pythae or lightning-hydra-template meets them: help() tells what a
class takes, vae(x) gives the ELBO's terms, embeddings and interpolations are one call, and the template's
conventions (train=false, callbacks=none, logger=many) work."""

from __future__ import annotations

import inspect
import json
import math
import pydoc

import torch
import wandb_files
from conftest import ROOT, TINY, run_app

import vaelab


def test_help_shows_what_each_model_takes():
    for cls, args in ((vaelab.VAE, ("latent_dim", "hidden_dim", "prior", "likelihood", "posterior")),
                      (vaelab.HierarchicalVAE, ("num_layers", "latent_dim", "prior"))):
        text = pydoc.render_doc(cls)
        head = text.split("Method resolution order")[0]  # the signature and the class's own docstring
        assert cls.__doc__ and cls.__doc__.splitlines()[0] in head and "Base class for all neural" not in head
        assert all(a in cls.__doc__ for a in args), cls
        assert all(a in inspect.signature(cls).parameters for a in args)
    assert str(inspect.signature(vaelab.Bernoulli)).startswith("()")


def test_a_vae_called_on_images_gives_the_elbo_terms():
    torch.manual_seed(0)
    vae = vaelab.HierarchicalVAE((1, 12, 12), latent_dim=3, hidden_dim=16)
    x = torch.rand(6, 1, 12, 12).bernoulli()
    noise = vae.draw_noise(6)
    terms = vae(x, noise)
    assert isinstance(terms, vaelab.ElboTerms)
    assert terms.recon.shape == (6,) and terms.kl_layers.shape == (2, 6)
    assert torch.allclose(terms.loss, vae.elbo_terms(x, noise).loss)
    torch.manual_seed(1)
    fresh = vae(x).loss
    torch.manual_seed(1)
    assert torch.equal(fresh, vae(x, vae.draw_noise(6)).loss)  # draw_noise draws what elbo_terms would


def test_embed_and_interpolate_are_one_call():
    torch.manual_seed(0)
    vae = vaelab.VAE((1, 12, 12), latent_dim=3, hidden_dim=16)
    x = torch.rand(25, 1, 12, 12)
    z = vaelab.embed(vae, x, batch_size=7)
    assert z.shape == (25, 3)
    assert torch.allclose(z, vae.posterior_means(x)[0], atol=1e-6)
    path = vaelab.interpolate(vae, x[0], x[1], steps=5)
    assert path.shape == (5, 1, 12, 12)
    ends = vae.decode_mean([torch.stack([z[0], z[1]])])
    assert torch.allclose(path[0], ends[0], atol=1e-5) and torch.allclose(path[-1], ends[1], atol=1e-5)
    assert vaelab.interpolate(vae, x[:3], x[3:6], steps=4).shape == (3, 4, 1, 12, 12)


def test_train_false_callbacks_none_and_logger_many(tmp_path, fashion_mnist):
    base = [*TINY, "extras.print_config=false", "trainer.max_epochs=1"]
    many = run_app(*base, "logger=many", f"hydra.run.dir={tmp_path / 'many'}")
    assert many.returncode == 0, many.stderr[-3000:]
    run = tmp_path / "many"
    results = json.loads((run / "results.json").read_text())
    assert (run / "metrics.csv").read_text().count("\n") > 2  # the CSV logger
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard
    (offline,) = (run / "wandb").glob("offline-run-*")  # and W&B, each with the run's curves
    assert any("val/loss" in row for row in wandb_files.history(offline))

    # train=false: the checkpoint tested, nothing trained, the same test NLL as the run's own test
    best = results["best_checkpoint"]
    # ... whatever model flags the command carries: the model is the checkpoint's, as vaelab-eval reads it
    tested = run_app(*base, "train=false", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'tested'}", "model=deep",
                     "prior=vamp")
    assert tested.returncode == 0, tested.stderr[-3000:]
    again = json.loads((tmp_path / "tested" / "results.json").read_text())
    assert again["trained"] is False and again["tested_checkpoint"] == best
    assert (again["model"], again["prior"]) == ("vanilla", "standard")
    said = [ln for ln in tested.stdout.splitlines() if ln.startswith("vaelab: ")]
    assert f"testing the checkpoint {best};" in said[0] and "resuming" not in tested.stdout, said
    assert said[-1].endswith(f", tested {best}") and "epochs" not in said[-1], said
    assert math.isclose(again["metrics"]["test/nll"], results["metrics"]["test/nll"], rel_tol=1e-6)
    assert not (tmp_path / "tested" / "checkpoints").exists()
    refused = run_app(*base, "train=false", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode != 0
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        "error: train=false tests a checkpoint and trains nothing: give it ckpt_path=<a checkpoint>"]

    # callbacks=none: no grids; Lightning's own checkpoint, which the run tests
    no_grids = [o for o in base if not o.startswith("callbacks.")]
    bare = run_app(*no_grids, "callbacks=none", "logger=csv", f"hydra.run.dir={tmp_path / 'bare'}")
    assert bare.returncode == 0, bare.stderr[-3000:]
    plain = json.loads((tmp_path / "bare" / "results.json").read_text())
    assert math.isfinite(plain["metrics"]["test/nll"])
    assert [p.name for p in (tmp_path / "bare" / "checkpoints").iterdir()] == ["epoch=0-step=8.ckpt"]
    assert not (tmp_path / "bare" / "samples").exists()


def test_vaelab_train_help_is_vaelabs_own():
    """--help lists the groups a user picks with their options (the default first, every one a file in conf/),
    no internal part (data's common and synthetic, paths, hydra), three example commands; Hydra's own text is
    behind --hydra-help."""
    proc = run_app("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vaelab-train: ") and "powered by Hydra" not in proc.stdout
    start = lines.index("Pick a part with group=option (the default first; the optional groups have none):") + 1
    listed = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, options = line.split(None, 1)
        listed[name] = options.split(", ")
    conf = ROOT / "conf"
    assert set(listed) == {p.name for p in conf.iterdir() if p.is_dir()} - {"hydra", "paths"}
    for name, options in listed.items():
        assert all((conf / name / f"{o}.yaml").is_file() for o in options), (name, options)
    assert listed["data"][0] == "fashion_mnist" and not {"common", "synthetic"} & set(listed["data"])
    assert listed["model"][0] == "vanilla" and listed["prior"][0] == "standard"
    examples = [ln for ln in lines[lines.index("Examples:") + 1:] if ln.startswith("  vaelab-train ")]
    assert len(examples) == 3 and any(" -m " in ln for ln in examples)
    assert "--hydra-help" in lines[-1]
