"""The images' per-channel means as a Gaussian prior, and the sampler's reading of x0's means under it.

An eps UNet whose output GroupNorm has one channel a group (the tiny preset's) cannot see x_t's
per-channel means: each group subtracts its feature's own spatial mean, and nothing is added back
after the output norm. Its x0 reading, (x_t - sigma eps) / alpha, then keeps those means as if they
were image (a flat prior on them), and the SDE's fresh noise piles them up: grey data samples with a
per-sample hue, colour data with more colour than it has (benchmarks/RESULTS.md, "The cause, pinned").

Taking each image's means m0 as N(mu, cov), the train split's, and x_t's as m_t = alpha m0 + sigma n,
n ~ N(0, I / pixels), their best reading is E[m0 | m_t] = mu + alpha cov (alpha^2 cov + sigma^2 /
pixels I)^-1 (m_t - alpha mu): a matrix and an offset per evaluation, computed once per chain. The
sampler shifts the means of the clipped x0 to it (a clip moves the means of an x0 whose pixels pass
[-1, 1], and would undo the reading) and hands the solver the output that reads as that x0.

For grey data the prior is exact: it has no colour, whatever the image shows, so x0's means come out
grey at every step. For colour data it is a guess from the means alone, blind to what the image
shows (a glyph's colour is its shape's): on the embedded set it cost no KID, on the emoji glyphs at
10,000 steps it cost much ("A prior on the means" in RESULTS). So the default turns it on only for
colourless data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SAMPLE_IMAGES = 2048  # train images the prior is estimated from: three means and six covariances
GREY_STD = 2 / 255  # colourless: the means' colour (less their grey) within one level of 0..255


@dataclass(frozen=True)
class ChannelMeans:
    """mu (C,) and cov (C, C) of the images' per-channel means in [-1, 1], from `images` images."""
    mu: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]
    images: int

    @classmethod
    def of(cls, images: torch.Tensor) -> ChannelMeans:
        """The prior of (N, C, H, W) images in [-1, 1] (one image: its means, with no spread)."""
        if images.dim() != 4 or len(images) < 1:
            raise ValueError(f"need (N, C, H, W) images, N >= 1, for the channel means, got {tuple(images.shape)}")
        m = images.double().mean((2, 3))
        cov = torch.atleast_2d(torch.cov(m.T, correction=1 if len(m) > 1 else 0))
        return cls(tuple(m.mean(0).tolist()), tuple(map(tuple, cov.tolist())), len(images))

    def to_dict(self) -> dict:
        return {"mu": list(self.mu), "cov": [list(r) for r in self.cov], "images": self.images}

    @classmethod
    def from_dict(cls, d: dict | None) -> ChannelMeans | None:
        return None if d is None else cls(tuple(d["mu"]), tuple(map(tuple, d["cov"])), int(d["images"]))

    def colourless(self) -> bool:
        """Whether the images' channel means carry no colour: more than one channel, and the means
        less their grey within GREY_STD of zero on average and in spread."""
        c = len(self.mu)
        if c < 2:
            return False
        grey = torch.eye(c, dtype=torch.float64) - 1 / c  # the projection off the grey axis
        mu, cov = torch.tensor(self.mu, dtype=torch.float64), torch.tensor(self.cov, dtype=torch.float64)
        spread = float(torch.trace(grey @ cov @ grey)) / c
        return float((grey @ mu).abs().max()) <= GREY_STD and spread <= GREY_STD ** 2

    def reading(self, alphas: Sequence[float], sigmas: Sequence[float],
                pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain (E, C, C), offset (E, C)), float64, with E[m0 | m_t] = offset + gain m_t at each of
        the E (alpha, sigma) of x_t = alpha x0 + sigma eps, for images of `pixels` pixels."""
        mu, cov = torch.tensor(self.mu, dtype=torch.float64), torch.tensor(self.cov, dtype=torch.float64)
        a = torch.tensor(alphas, dtype=torch.float64)[:, None, None]
        s = torch.tensor(sigmas, dtype=torch.float64)[:, None, None]
        eye = torch.eye(len(mu), dtype=torch.float64)
        gain = a * cov @ torch.linalg.inv(a ** 2 * cov + s ** 2 / pixels * eye)
        offset = mu - (gain @ (a[..., 0] * mu)[..., None])[..., 0]
        return gain, offset


def prior_for(model, diffusion, mean_prior: bool | None = None) -> ChannelMeans | None:
    """The prior the sampler reads x0's means with, resolved once: the diffusion's (its training
    data's) when `mean_prior`, or by default (None) when it is exact and the model needs it: colourless
    data and a model that cannot see the means (UNet.output_hides_means: an eps model of one-channel
    output groups), where it was measured; None otherwise. True without a prior is an error naming
    the flag."""
    prior = getattr(diffusion, "channel_means", None)
    if mean_prior and prior is None:
        raise ValueError("--mean-prior needs the training data's channel means, which this model's checkpoint "
                         "lacks (runs trained by ddpm-fast record them; diffusers models have none)")
    if mean_prior is None:
        hides = getattr(model, "output_hides_means", lambda: False)()
        mean_prior = hides and diffusion.prediction == "epsilon" and prior is not None and prior.colourless()
    return prior if mean_prior else None
