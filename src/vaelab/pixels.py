"""What pixel values a likelihood is given, and so what its NLL and bits/dim mean: one fact, decided here, read by
the data (which dequantises), the metrics (test/nll, test/bpd), results.json and the report.

- binary: binarised images (data.binarize static or dynamic) under a Bernoulli likelihood: the NLL of the binary
  images; bits/dim = NLL / (D ln 2), as the binarised-MNIST literature reports it.
- 8-bit: the values k/255 of 8-bit images under a discrete likelihood (discretized_logistic, dmol,
  discretized_gaussian): each pixel an exact probability mass, so the NLL is of the 8-bit images themselves and
  bits/dim = NLL / (D ln 2) is the figure PixelCNN++, VDVAE and NVAE report.
- dequantized: a density on [0, 1] (gaussian, continuous_bernoulli) is given the 8-bit images dequantised,
  y = (k + u) / 256 with u ~ U[0, 1) per pixel, fresh each training batch and fixed for validation and test; then
  NLL(y) + D ln 256 is an upper bound on the 8-bit images' NLL (Theis et al., 2016), reported as test/nll, and its
  bits/dim. A density at the values k/255 themselves is no probability: it grows without bound as the variance
  shrinks (a negative "bits/dim").
- grey: a Bernoulli likelihood on grey pixels (data.binarize=none): binary cross-entropy, not a normalised
  likelihood of anything, so no bits/dim is reported (continuous_bernoulli is its normalised form).
"""

from __future__ import annotations

import math

from vaelab.errors import ConfigError

KINDS = ("binary", "8-bit", "dequantized", "grey")
MEANING = {
    "binary": "bits/dim of the binarised images",
    "8-bit": "bits/dim of the 8-bit images (a discrete likelihood: exact)",
    "dequantized": "bits/dim of the 8-bit images, an upper bound (a density on dequantised pixels, + D log 256)",
    "grey": "no bits/dim (BCE on grey pixels is not a likelihood)",
}


def pixel_values(likelihood_pixels: str, binarized: bool, likelihood_name: str = "this likelihood") -> str:
    """The pixel values a likelihood that models `likelihood_pixels` (binary, 8-bit or continuous: its class's
    `pixels`) is given, on binarised data or not; a pairing that means nothing is one sentence (ConfigError)."""
    if binarized:
        if likelihood_pixels != "binary":
            what = "8-bit pixel values" if likelihood_pixels == "8-bit" else "grey pixels in [0, 1]"
            raise ConfigError(f"likelihood={likelihood_name} does not fit binarised data (it models {what}); use "
                              "data.binarize=none, or likelihood=bernoulli for binary images")
        return "binary"
    return {"binary": "grey", "8-bit": "8-bit", "continuous": "dequantized"}[likelihood_pixels]


def without_data_module(likelihood_pixels: str) -> str:
    """The pixels of data that do not say (a plain DataLoader): what the likelihood models, and for a density,
    whose images were not dequantised by vaelab, "grey": its NLL as it is, and no bits/dim."""
    return "grey" if likelihood_pixels == "continuous" else likelihood_pixels


def nll_offset(pixels: str, num_pixels: int) -> float:
    """Nats added to a likelihood's NLL, and to its -ELBO and reconstruction term, to make each of the 8-bit
    images (a bound on their NLL): D ln 256 for a density on dequantised pixels in [0, 1], else 0."""
    return num_pixels * math.log(256.0) if pixels == "dequantized" else 0.0


def has_bpd(pixels: str) -> bool:
    return pixels != "grey"


def pixels_note(rows: list[dict]) -> str:
    """One sentence for a results table: what each kind of pixels in its `pixels` column means for its figures."""
    kinds = [k for k in dict.fromkeys(r.get("pixels") for r in rows) if k in MEANING]
    return "Pixels: " + "; ".join(f"{k}: {MEANING[k]}" for k in kinds) + "." if kinds else ""
