"""Held-out evaluation of a trained model: eps-MSE averaged over t, and the variational bound in
bits/dim (Ho et al.'s L_0 discretised decoder + KL terms + prior). FID/KID are in metrics.py."""
from __future__ import annotations

import torch

from .diffusion import GaussianDiffusion


@torch.no_grad()
def heldout_mse(model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 64,
                draws: int = 4, seed: int = 0) -> float:
    """Mean eps-MSE over `draws` (t, noise) pairs per image, with a fixed generator: unweighted and
    in eps whatever the model predicts (GaussianDiffusion.eps_mse), so runs of any --loss-weight
    and --prediction compare."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(draws):
        for x0 in images.split(batch_size):
            x0 = x0.to(device)
            total += diffusion.eps_mse(model, x0, gen).item() * x0.shape[0]
            n += x0.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def bits_per_dim(model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 64,
                 t_samples: int | None = None, variance: str = "posterior", seed: int = 0) -> dict:
    """Negative ELBO in bits/dim: L_0 (exact) + sum_{t>=1} L_t + L_T (prior).

    With t_samples < T-1 the sum over t >= 1 is estimated from that many evenly spaced t, scaled
    by (T-1)/t_samples (the full sum costs T model calls per image)."""
    if diffusion.schedule == "continuous":
        raise ValueError("bits/dim needs a discrete schedule (linear or cosine)")
    model.eval()
    device = next(model.parameters()).device
    T = diffusion.timesteps
    k = T - 1 if t_samples is None else max(1, min(t_samples, T - 1))
    ts = torch.linspace(1, T - 1, k).round().long().tolist()
    scale = (T - 1) / len(ts)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {"decoder": 0.0, "kl": 0.0, "prior": 0.0}
    n = 0
    for x0 in images.split(batch_size):
        x0 = x0.to(device)
        B = x0.shape[0]
        noise = lambda: torch.randn(x0.shape, generator=gen, device=device)  # noqa: E731
        zero = torch.zeros(B, dtype=torch.long, device=device)
        sums["decoder"] += diffusion.vb_terms_bpd(model, x0, zero, variance, noise()).sum().item()
        for t in ts:
            tb = torch.full((B,), t, dtype=torch.long, device=device)
            sums["kl"] += scale * diffusion.vb_terms_bpd(model, x0, tb, variance, noise()).sum().item()
        sums["prior"] += diffusion.prior_bpd(x0).sum().item()
        n += B
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["total"] = out["decoder"] + out["kl"] + out["prior"]
    out["t_samples"] = len(ts)
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
                 "sigma_min": sampler.scheduler.sigma_min}  # None: the schedule's smallest
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
