"""Post-hoc samplers (as pythae's GaussianMixtureSampler): fit a Gaussian mixture to the training set's posterior
means of the top layer and decode draws from it, instead of drawing z from the prior. A VAE's aggregate posterior
often fills the prior unevenly; sampling where the codes are gives sharper images. scikit-learn fits the mixture."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from vaelab.evaluation.latents import embed


class GMMSampler:
    """A K-component, full-covariance Gaussian mixture over a model's top-layer posterior means."""

    def __init__(self, model, components: int = 10, seed: int = 0) -> None:
        self.model, self.components, self.seed = model, components, seed
        self.gmm = None

    def fit(self, train_images: Tensor) -> GMMSampler:
        from sklearn.mixture import GaussianMixture

        codes = embed(self.model, train_images).double().numpy()
        if codes.shape[0] < self.components:
            raise ValueError(f"{codes.shape[0]} training codes cannot fit {self.components} components")
        self.gmm = GaussianMixture(self.components, covariance_type="full", random_state=self.seed, reg_covar=1e-5)
        self.gmm.fit(codes)
        self.train_codes = codes.shape[0]
        return self

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n images: z_top from the mixture, the lower layers at their conditional priors' means, decoded to the
        mean of p(x|z). [n, C, H, W]."""
        torch.manual_seed(self.seed)
        self.gmm.random_state = self.seed
        z, _ = self.gmm.sample(n)
        z = torch.as_tensor(z[torch.randperm(n).numpy()], dtype=torch.float32,
                            device=next(self.model.parameters()).device)
        return self.model.decode_mean(self.model.latents_from_top(z)).cpu()

    def log_likelihood(self, images: Tensor) -> dict[str, float]:
        """Mean log-density per code of these images' top-layer posterior means: under the mixture, and under the
        model's own prior for comparison (nats per code)."""
        codes = embed(self.model, images)
        gmm = float(self.gmm.score(codes.double().numpy()))
        with torch.no_grad():
            device = next(self.model.parameters()).device
            prior = float(self.model.prior.log_prob(codes.to(device)).mean())
        return {"gmm": gmm if math.isfinite(gmm) else float("nan"), "prior": prior}


def draw_gmm(model, datamodule, out_dir: Path, components: int = 10, num_samples: int = 64,
             seed: int = 0) -> tuple[dict[str, Path], dict[str, float]]:
    """Fit the mixture to a data module's training images (binarised as for training: one fixed draw), write its
    samples (gmm_samples.png) and the test codes' log-likelihood under it and under the prior (gmm.json) into
    out_dir: what vaelab-sample sampler=gmm and vaelab-report draw."""
    from torchvision.utils import make_grid, save_image

    from vaelab.data.loader import bernoulli_draw
    from vaelab.files import write_json

    train = datamodule.train_images()
    if datamodule.binarize == "dynamic":
        train = bernoulli_draw(train, torch.Generator(device=train.device).manual_seed(seed))
    elif datamodule.is_binary:
        train = datamodule.train_set.__getitems__(list(range(len(datamodule.train_set))))
    sampler = GMMSampler(model, components, seed).fit(train)
    ll = sampler.log_likelihood(datamodule.test_set.__getitems__(list(range(len(datamodule.test_set)))))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"gmm_samples": out_dir / "gmm_samples.png", "gmm": out_dir / "gmm.json"}
    save_image(make_grid(sampler.sample(num_samples), nrow=8, padding=2, pad_value=0.5), paths["gmm_samples"])
    write_json(paths["gmm"], {"components": components, "covariance": "full", "train_codes": len(train),
                              "test_codes": len(datamodule.test_set), "test_log_likelihood_per_code": ll["gmm"],
                              "prior_test_log_likelihood_per_code": ll["prior"], "seed": seed})
    return paths, ll
