"""Held-out evaluation of a trained model: eps-MSE averaged over t and per quarter of t, and the
variational bound in bits/dim (Ho et al.'s L_0 discretised decoder + KL terms + prior). FID/KID are
in metrics.py."""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple

import torch

from .diffusion import GaussianDiffusion


class HeldOutMSE(NamedTuple):
    mean: float
    std_err: float | None  # over the images; None for one image
    by_quartile: tuple[float | None, ...]  # q0 (the least noise) to q3; None for a quarter no draw fell in


def image_generator(seed: int, key: str, index: int, device: torch.device) -> torch.Generator:
    """The generator of image `index`'s draws under `key` (a pass of the figure) and `seed`: each
    image draws its own (t, noise), so a figure is the same whatever --batch-size splits the images
    into and an image's draws the same whatever --images keeps after it. Its seed is a hash of the
    three, not an offset, so no two (seed, key, index) share a stream."""
    digest = hashlib.blake2b(f"{seed}/{key}/{index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


def per_image(generators: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """draw(g) for each image's generator, stacked along the batch: a batch's draw image by image."""
    return torch.cat([draw(g) for g in generators])


@torch.no_grad()
def heldout_mse(model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 64,
                draws: int = 4, seed: int = 0) -> HeldOutMSE:
    """Mean eps-MSE over `draws` (t, noise) pairs per image, each image's from its own generator
    (image_generator: key "mse" and the draw's number); its standard error over the images (each
    image's mean over its draws); and the mean of the draws in each quarter of the noise levels
    (GaussianDiffusion.quartile), which says where in t a model errs. Unweighted and in eps whatever
    the model predicts (GaussianDiffusion.eps_mse), so runs of any --loss-weight and --prediction
    compare."""
    model.eval()
    device = next(model.parameters()).device
    image_mse = torch.zeros(len(images), dtype=torch.float64)
    q_sum, q_count = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for d in range(draws):
        start = 0
        for x0 in images.split(batch_size):
            x0 = x0.to(device)
            gens = [image_generator(seed, f"mse{d}", start + i, device) for i in range(len(x0))]
            # (x_t, t, noise, alpha-bar), each the images' own draws stacked
            inputs = [torch.cat(part) for part in zip(*(diffusion.training_inputs(x0[i:i + 1], g)
                                                        for i, g in enumerate(gens)))]
            err = diffusion.eps_mse_on(model, inputs, reduction="none").double().cpu()
            image_mse[start:start + len(x0)] += err
            q = diffusion.quartile(inputs[1]).cpu()
            q_sum.index_add_(0, q, err)
            q_count.index_add_(0, q, torch.ones_like(err))
            start += len(x0)
    image_mse /= draws
    by_quartile = tuple((s / c).item() if c else None for s, c in zip(q_sum, q_count))
    if len(image_mse) == 0:
        return HeldOutMSE(0.0, None, by_quartile)
    std_err = (image_mse.std() / len(image_mse) ** 0.5).item() if len(image_mse) > 1 else None
    return HeldOutMSE(image_mse.mean().item(), std_err, by_quartile)


def t_strata(t_samples: int, timesteps: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of t that split 1..T-1 into `t_samples` strata for bits/dim's sum: the first
    half one t each, the rest of geometrically growing width. L_t falls steeply with t (on three
    models 74-84% of the sum lies in t <= 10 of 999), so the steep head is summed exactly and each
    tail stratum spans t whose terms differ little. t_samples >= T-1 gives every t alone: the
    exact sum."""
    if t_samples < 1:
        raise ValueError(f"--bpd-t must be at least 1, got {t_samples}")
    n = min(t_samples, timesteps - 1)
    head = n // 2
    edges = list(range(1, head + 2))
    lo, tail = head + 1, n - head
    for i in range(1, tail + 1):
        # at least one t a stratum; the last edge is T itself
        edges.append(max(edges[-1] + 1, round(lo * (timesteps / lo) ** (i / tail))))
    edges[-1] = timesteps
    return list(zip(edges[:-1], edges[1:]))


def draw_in_stratum(lo: int, hi: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n values of t drawn uniformly from [lo, hi), on the generator's device: one stratum's draw
    for each of n images."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return lo + (u * (hi - lo)).long().clamp(max=hi - lo - 1)  # clamp: u * width may round up to width


@torch.no_grad()
def bits_per_dim(model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 64,
                 t_samples: int | None = None, variance: str = "posterior", seed: int = 0) -> dict:
    """Negative ELBO in bits/dim: L_0 (exact) + sum_{t>=1} L_t + L_T (prior), and its standard error
    over the images.

    With t_samples < T-1 the sum over t >= 1 is a stratified estimate (t_strata): each image draws
    one t in each stratum, its term weighted by the stratum's width, so the estimate is unbiased
    and costs t_samples model calls per image instead of T-1 (docs/bpd_estimate.json measures its
    spread against the exact sum's). Each image draws its t and noise from its own generator
    (image_generator, key "bpd"), in the order decoder noise, then each stratum's t and noise."""
    if diffusion.schedule == "continuous":
        raise ValueError("bits/dim needs a discrete schedule (linear or cosine)")
    model.eval()
    device = next(model.parameters()).device
    T = diffusion.timesteps
    strata = t_strata(T - 1 if t_samples is None else t_samples, T)
    totals, sums = [], {"decoder": 0.0, "kl": 0.0, "prior": 0.0}
    start = 0
    for x0 in images.split(batch_size):
        x0 = x0.to(device)
        B = x0.shape[0]
        gens = [image_generator(seed, "bpd", start + i, device) for i in range(B)]
        start += B

        def noise() -> torch.Tensor:
            return per_image(gens, lambda g: torch.randn((1, *x0.shape[1:]), generator=g, device=device))

        decoder = diffusion.vb_terms_bpd(model, x0, torch.zeros(B, dtype=torch.long, device=device), variance,
                                         noise())
        kl = torch.zeros(B, dtype=torch.float64, device=device)
        for lo, hi in strata:
            tb = per_image(gens, lambda g: draw_in_stratum(lo, hi, 1, g))  # noqa: B023 - called at once
            kl += (hi - lo) * diffusion.vb_terms_bpd(model, x0, tb, variance, noise()).double()
        prior = diffusion.prior_bpd(x0)
        totals.append(decoder.double() + kl + prior.double())
        for key, v in (("decoder", decoder), ("kl", kl), ("prior", prior)):
            sums[key] += v.sum().item()
    total = torch.cat(totals)
    out = {k: v / max(len(total), 1) for k, v in sums.items()}
    out["total"] = out["decoder"] + out["kl"] + out["prior"]
    out["std_err"] = (total.std() / len(total) ** 0.5).item() if len(total) > 1 else None
    out["t_samples"] = len(strata)
    return out


FID_MIN_SAMPLES = 2048  # below the feature dimension the covariance is singular: FID is not meaningful


@torch.no_grad()
def sample_in_batches(sampler, n: int, image_size: int, generator: torch.Generator | None,
                      batch_size: int = 256, classes: torch.Tensor | None = None) -> torch.Tensor:
    """n samples of a FastSampler in [-1, 1], on the CPU, drawn in batches of at most batch_size
    that take their noise in turn from `generator` (None: the device's default one, as CUDA-graph
    replays need), so up to batch_size they are one call's; `classes`: the class of each."""
    chunks = [sampler.sample(min(batch_size, n - i), image_size, generator=generator,
                             classes=None if classes is None else classes[i:i + batch_size]).cpu()
              for i in range(0, n, batch_size)]
    return torch.cat(chunks)


def generate(sampler, n: int, image_size: int, device: torch.device, seed: int = 0,
             batch_size: int = 256, classes: torch.Tensor | None = None) -> torch.Tensor:
    """n samples of a FastSampler whose model is on `device`, in [-1, 1] (on the CPU), drawn in
    batches from one generator seeded `seed` (sample_in_batches)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return sample_in_batches(sampler, n, image_size, gen, batch_size, classes)


def sample_quality(sampler, data, image_size: int, device: torch.device, fid_n: int = 0, kid_n: int = 0, seed: int = 0,
                   splits: tuple[str, ...] = ("test",), ref_limit: int | None = 10000,
                   classes: torch.Tensor | None = None) -> dict:
    """FID (on fid_n samples) and KID (on kid_n) of a FastSampler's samples against each split's
    cached reference statistics (at most ref_limit images of a split). Needs the [eval] extra."""
    samples = generate(sampler, max(fid_n, kid_n), image_size, device, seed, classes=classes)
    out: dict = {"samples": len(samples), "method": sampler.method, "evaluations": sampler.num_evaluations,
                 "sigma_min": sampler.scheduler.sigma_min,  # None: the schedule's smallest
                 "sigma_max": sampler.scheduler.sigma_max}  # None: the schedule's largest
    return out | score_samples(samples, data, image_size, device, fid_n, kid_n, seed, splits, ref_limit)


def score_samples(samples: torch.Tensor, data, image_size: int, device: torch.device, fid_n: int = 0,
                  kid_n: int = 0, seed: int = 0, splits: tuple[str, ...] = ("test",),
                  ref_limit: int | None = 10000) -> dict:
    """FID (first fid_n) and KID (first kid_n) of given samples in [-1, 1] against each split's
    reference statistics: samples made elsewhere (a GPU machine without the Inception weights) are
    scored here the same way as sample_quality's."""
    from . import metrics
    from .data import load_images

    feats = metrics.inception_features(samples, device=device)
    out: dict = {}
    for split in splits:
        ref = metrics.reference_stats(data, image_size, split, load_images, limit=ref_limit,
                                      channels=samples.shape[1], device=device)
        if fid_n:
            out[f"fid_{split}"] = metrics.fid_from_stats(ref.mu, ref.sigma, *metrics.mean_cov(feats[:fid_n]))
        if kid_n:
            size = min(1000, kid_n, len(ref.features))
            mean, std = metrics.kid(ref.features, feats[:kid_n], subsets=100, subset_size=size, seed=seed)
            out[f"kid_{split}"], out[f"kid_{split}_std"] = mean, std
    return out
