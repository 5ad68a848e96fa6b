"""vaelab as a library: the README's Python example, loading models back both ways, and the installed wheel."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR, ROOT, app_env, run_app

from vaelab import VAEModule, load_model
from vaelab.errors import CheckpointError


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_trains_evaluates_and_loads_back(tmp_path, fashion_mnist):
    code = readme_example().replace('root="data"', f'root="{fashion_mnist}"')
    code = code.replace("max_epochs=2", "max_epochs=1")
    code += """
import torch
assert not vae.training and images.shape == (16, 1, 28, 28) and torch.isfinite(images).all()
weights = vae.state_dict()
assert all(torch.equal(v, weights[k]) for k, v in module.model.state_dict().items())
assert all(torch.equal(v, weights[k]) for k, v in trainer.lightning_module.model.state_dict().items())
print("BEST", best)
"""
    script = tmp_path / "example.py"
    script.write_text(code)
    env = app_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # as quiet as the app: vaelab's progress lines and the script's own prints, nothing of Lightning's
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("epoch 1/1", "test", "BEST ")) for ln in lines), lines
    assert not [ln for ln in proc.stderr.splitlines() if ln.strip()], proc.stderr[-3000:]
    nll = float(re.search(r"test NLL ([\d.]+) nats", proc.stdout).group(1))
    assert 200 < nll < 600
    best = re.search(r"^BEST (.+)$", proc.stdout, re.M).group(1)
    # vaelab-eval takes a plain Trainer's checkpoint: the data set comes from the data module's saved arguments
    # (Lightning's file names hold '=', which a Hydra override takes in quotes)
    out = tmp_path / "eval.json"
    proc = run_app(f"ckpt_path='{tmp_path / best}'", "importance_samples=8", "subset=50", f"data_root={fashion_mnist}",
                   f"output={out}", module="vaelab.cli.eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "VAE" and res["prior"] == "VampPrior" and res["num_images"] == 50


def test_a_vaelab_train_checkpoint_loads_both_ways_and_names_only_vaelab_parts(train_run, tmp_path):
    run_dir, res, _ = train_run("model=deep", "prior=vamp", "prior.num_components=20", "trainer.max_epochs=1",
                                "logger=csv")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    vae = load_model(ckpt)
    assert type(vae).__name__ == "HierarchicalVAE" and vae.prior.num_components == 20 and not vae.training
    module = VAEModule.load_from_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in module.state_dict().items():
        if k.startswith("model."):
            assert torch.equal(v, saved[k]) and torch.equal(v, vae.state_dict()[k[len("model."):]])
    assert module.recipe.importance_samples == 32 and module.recipe.config["seed"] == 1234  # the run's own recipe
    # a spec naming something other than a vaelab part is refused, never called
    old = torch.load(ckpt, weights_only=True)
    del old["vaelab_config"]
    old["vaelab_model"] = {**vae.spec(), "likelihood": {"_target_": "subprocess.run", "args": "echo pwned"}}
    torch.save(old, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="subprocess.run, which is not a Likelihood"):
        load_model(tmp_path / "evil.ckpt")


def test_the_wheel_installs_and_trains_from_another_directory(tmp_path, fashion_mnist):
    """pip install of the built wheel (not editable) into a fresh venv: conf/ ships inside the package."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: building leaves build/ in the source tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("vaelab-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]  # the dependencies, as a plain path: no vaelab
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in app_env().items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import vaelab; print(vaelab.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    proc = subprocess.run([str(venv / "bin" / "vaelab-train"), f"data.root={DATA_DIR}", "data.subset=200",
                           "data.batch_size=50", "trainer.max_epochs=1", "eval.importance_samples=4", "logger=csv",
                           "trainer.enable_progress_bar=false", "hydra.run.dir=run"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((elsewhere / "run" / "results.json").read_text())["status"] == "finished"


def test_every_prior_and_posterior_composes_from_the_top_level_names():
    """The priors and posteriors README names are importable from `vaelab` and compose with both networks as the
    factories the models take; each combination gives a finite ELBO whose KL is the prior's and flow's."""
    from functools import partial

    import vaelab

    x = torch.rand(4, 1, 8, 8).bernoulli()
    priors = [vaelab.StandardNormal, partial(vaelab.VampPrior, num_components=3),
              partial(vaelab.MixtureOfGaussians, num_components=3)]
    posteriors = [vaelab.GaussianPosterior, partial(vaelab.IAFPosterior, num_flows=2, hidden_dim=8)]
    for net in (partial(vaelab.VAE, latent_dim=2), partial(vaelab.HierarchicalVAE, latent_dim=2, num_layers=2)):
        for prior in priors:
            for posterior in posteriors:
                model = net((1, 8, 8), hidden_dim=16, prior=prior, posterior=posterior)
                assert isinstance(model.prior, vaelab.Prior)
                terms = model(x)
                assert torch.isfinite(terms.loss).all() and terms.loss.shape == (4,), (net, prior, posterior)
                assert model.posterior.is_flow == (posterior is not vaelab.GaussianPosterior)
    assert {"Prior", "MixtureOfGaussians", "GaussianPosterior", "IAFPosterior"} <= set(vaelab.__all__)
