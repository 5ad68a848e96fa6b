"""The model a spec (spec.py) describes, rebuilt from its parts' classes: the one place in models/ that knows every
part, so that the parts themselves import only the leaf spec.py and nothing imports back."""

from __future__ import annotations

import functools

import torch

from vaelab.errors import CheckpointError
from vaelab.models.base import VAEBase
from vaelab.models.likelihoods import Likelihood
from vaelab.models.priors import Prior
from vaelab.models.spec import locate


def build_from_spec(spec: dict):
    """The model a spec describes, with fresh (untrained) weights."""
    def split(part: dict, base: type):
        args = {k: v for k, v in part.items() if k != "_target_"}
        return locate(part["_target_"], base), args

    lik_cls, lik_args = split(spec["likelihood"], Likelihood)
    prior_cls, prior_args = split(spec["prior"], Prior)
    model_cls, model_args = split(spec["model"], VAEBase)
    posterior = None
    if spec.get("posterior"):
        post_cls, post_args = split(spec["posterior"], torch.nn.Module)
        if not hasattr(post_cls, "is_flow"):  # vaelab's posteriors say whether they are flows
            raise CheckpointError(f"the checkpoint's posterior {spec['posterior']['_target_']} is not a posterior")
        posterior = functools.partial(post_cls, **post_args)
    return model_cls(**model_args, likelihood=lik_cls(**lik_args), prior=functools.partial(prior_cls, **prior_args),
                     posterior=posterior)
