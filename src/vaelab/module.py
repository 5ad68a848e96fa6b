"""VAEModule: the Lightning wrapper every VAE shares. It knows the protocol (models/base.py), not the model."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vaelab.errors import ConfigError, NonFiniteLossError
from vaelab.metrics import ActiveUnits, ElboMeans, ImportanceSampledNLL, bits_per_dim, importance_log_weights
from vaelab.models.base import ElboTerms, VAEBase

KL_DESCRIPTION = {
    True: "closed-form KL(q(z|x) || p(z))",
    False: "Monte Carlo KL estimate log q(z|x) - log p(z) at z ~ q(z|x) (no closed form for this prior)",
}


class VAEModule(L.LightningModule):
    """Trains any VAE on -ELBO = recon + KL with linear KL warm-up, beta weighting and free bits; tests it
    with the importance-sampled NLL.

    beta: weight of the KL term after warm-up (1 gives the true ELBO).
    warmup_epochs: beta rises linearly from 0 over this many epochs (0: no warm-up).
    free_bits: floor, in nats, on the batch-mean KL of each stochastic layer (0: off).
    importance_samples: K for test/nll.
    fused: use Adam's fused kernel where the parameters' device supports it (CPU and CUDA): one kernel for
        all parameters instead of a handful of ops per tensor, about 3x faster on a CPU.
    """

    def __init__(
        self,
        model: VAEBase,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        beta: float = 1.0,
        warmup_epochs: float = 0.0,
        free_bits: float = 0.0,
        importance_samples: int = 1000,
        importance_points_per_pass: int = 5_000,
        check_finite_every_n_steps: int | None = None,
        importance_seed: int = 0,
        fused: bool = True,
        run_config: dict | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"optim.lr must be positive, got {lr} (conf/train.yaml)")
        if beta < 0:
            raise ConfigError(f"loss.beta must be >= 0, got {beta} (conf/loss/)")
        if warmup_epochs < 0:
            raise ConfigError(f"loss.warmup_epochs must be >= 0 (0 turns warm-up off), got {warmup_epochs}")
        if free_bits < 0:
            raise ConfigError(f"loss.free_bits must be >= 0 nats (0 turns it off), got {free_bits}")
        if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or importance_samples <= 0:
            raise ConfigError(
                f"eval.importance_samples must be a positive integer (K for test/nll, e.g. 1000), "
                f"got {importance_samples!r}"
            )
        self.save_hyperparameters(ignore=["model", "run_config"])
        self.model = model
        self.run_config = run_config
        self._first_bad: Tensor | None = None
        self.num_dims = math.prod(model.image_shape)
        self.test_nll = ImportanceSampledNLL()
        layers = len(model.latent_dims)
        self.epoch_means = nn.ModuleDict({f"{s}_": ElboMeans(layers) for s in ("train", "val", "test")})
        self.epoch_means["train_"].persistent(True)  # a run resumed mid-epoch keeps the epoch's sums
        self.val_active = nn.ModuleList(ActiveUnits(d) for d in model.latent_dims)
        self.test_active = nn.ModuleList(ActiveUnits(d) for d in model.latent_dims)

    # -- the objective --------------------------------------------------------------------------
    def beta(self) -> float:
        """KL weight now: linear warm-up from 0 to loss.beta over warmup_epochs (fractional epochs)."""
        b, warm = self.hparams.beta, self.hparams.warmup_epochs
        if warm <= 0 or self._trainer is None:
            return b
        steps_per_epoch = max(1, self.trainer.num_training_batches)
        progress = self.global_step / steps_per_epoch / warm
        return b * min(1.0, progress)

    def _log_epoch_means(self, stage: str) -> None:
        """Log the epoch's means of -ELBO's terms as {stage}/loss, /elbo, /recon, /kl (and /kl_l per layer)."""
        metric = self.epoch_means[f"{stage}_"]  # (ModuleDict keys may not shadow Module.train)
        self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})
        metric.reset()

    def objective(self, terms: ElboTerms, beta: float) -> Tensor:
        """What training minimises: recon + beta * sum_l max(free_bits, KL_l), batch means. With beta=1 and
        no free bits it is -ELBO; free bits (Kingma et al. 2016) remove the pressure on a layer's KL below
        free_bits nats, against posterior collapse."""
        kl_layers = terms.kl_layers.mean(1)  # [L]
        if self.hparams.free_bits > 0:
            kl_layers = kl_layers.clamp(min=self.hparams.free_bits)
        return terms.recon.mean() + beta * kl_layers.sum()

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        terms = self.model.elbo_terms(x)
        beta = self.beta()
        objective = self.objective(terms, beta)
        every = self.check_every
        if every == 1:  # on a CPU reading the scalar costs no sync: check it, and look at the terms only if bad
            if not math.isfinite(objective.item()):
                self._track_finite(terms)
                self.raise_if_nonfinite()
        else:
            self._track_finite(terms)
            if every and (self.global_step + 1) % every == 0:
                self.raise_if_nonfinite()
        self.epoch_means["train_"].update(terms.recon, terms.kl_layers)
        every_log = self.trainer.log_every_n_steps
        if every_log and (self.global_step + 1) % every_log == 0:  # per-step curves, when Lightning writes logs
            recon, kl = terms.recon.detach().mean(), terms.kl.detach().mean()
            self.log_dict({"train_step/loss": recon + kl, "train_step/elbo": -(recon + kl),
                           "train_step/recon": recon, "train_step/kl": kl, "train_step/objective": objective.detach(),
                           "train/beta": beta}, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return objective

    @property
    def check_every(self) -> int:
        """Steps between host-device syncs for the NaN check: every step on CPU (free there), every 50 on
        an accelerator unless eval.check_finite_every_n_steps says otherwise."""
        every = self.hparams.check_finite_every_n_steps
        return every if every is not None else (1 if self.device.type == "cpu" else 50)

    def _track_finite(self, terms: ElboTerms) -> None:
        """Remember, on the device and without a sync, the first step whose recon or KL was not finite."""
        bad = torch.stack([~torch.isfinite(terms.recon.detach()).all(), ~torch.isfinite(terms.kl_layers.detach()).all()])
        if self._first_bad is None or self._first_bad.device != bad.device:
            self._first_bad = torch.full((3,), -1, dtype=torch.long, device=bad.device)  # step, recon, kl
        fresh = bad.any() & (self._first_bad[0] < 0)
        # torch.full fills on the device; torch.tensor([step], device=cuda) would copy from host memory, a sync
        now = torch.cat([torch.full((1,), self.global_step, dtype=torch.long, device=bad.device), bad.long()])
        self._first_bad = torch.where(fresh, now, self._first_bad)

    def raise_if_nonfinite(self) -> None:
        """One sync: stop with a clear sentence if any step so far had a NaN or infinite loss. Called every
        check_every steps, and before anything is saved (validation, preemption), so no broken checkpoint is
        ever written."""
        if self._first_bad is None or int(self._first_bad[0]) < 0:
            return
        step, recon_bad, kl_bad = (int(v) for v in self._first_bad.tolist())
        which = " and ".join(t for t, b in (("reconstruction term", recon_bad), ("KL term", kl_bad)) if b)
        steps = max(1, self.trainer.num_training_batches) if self._trainer is not None else 0
        epoch = step // steps if steps else self.current_epoch
        raise NonFiniteLossError(
            f"Training stopped: the loss became NaN or infinite in the {which} at step {step} "
            f"(epoch {epoch}); lower optim.lr or check the data for NaNs. Checkpoints already "
            "saved were not touched."
        )

    def on_validation_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()
        self._log_epoch_means("train")

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        terms = self.model.elbo_terms(x)
        self.epoch_means["val_"].update(terms.recon, terms.kl_layers)
        for metric, means in zip(self.val_active, self.model.posterior_means(x)):
            metric.update(means)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")
        self._log_active_units("val", self.val_active)

    def test_step(self, batch, batch_idx: int) -> None:
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        terms = self.model.elbo_terms(x)
        self.epoch_means["test_"].update(terms.recon, terms.kl_layers)
        for metric, means in zip(self.test_active, self.model.posterior_means(x)):
            metric.update(means)
        log_w = importance_log_weights(
            self.model, x, self.hparams.importance_samples, self.hparams.importance_points_per_pass,
            index=index, seed=self.hparams.importance_seed,
        )  # [K, B]
        self.test_nll.update(log_w)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")
        nll = self.test_nll.compute()
        self.log_dict({"test/nll": nll, "test/nll_mc_se": self.test_nll.standard_error(),
                       "test/bpd": bits_per_dim(nll, self.num_dims)})
        self.test_nll.reset()
        self._log_active_units("test", self.test_active)

    def _log_active_units(self, stage: str, metrics: nn.ModuleList) -> None:
        counts = [m.compute() for m in metrics]
        values = {f"{stage}/active_units": sum(counts)}
        if len(counts) > 1:
            values.update({f"{stage}/active_units_{i + 1}": c for i, c in enumerate(counts)})
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()})
        for m in metrics:
            m.reset()

    def configure_optimizers(self):
        return adam(list(self.parameters()), self.hparams.lr, self.hparams.weight_decay, self.hparams.fused)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:  # lets tools rebuild the model from the checkpoint alone
            checkpoint["vaelab_config"] = self.run_config
        # the generator behind reparameterisation noise: a resumed run draws what an unbroken one would
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.Adam:
    """Adam, with the fused kernel when asked for and the parameters' device and dtype have one (torch checks
    this when the optimiser is built); otherwise torch's default implementation. Same algorithm either way."""
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
