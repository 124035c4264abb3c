"""evaluate's bits/dim: the strata of t, and the estimate over them against the exact sum, on terms
L_t of a known form (the model's terms patched out, so the arithmetic of the estimate is what is
tested; test_objectives checks the terms themselves against Ho et al.'s formulas)."""
import math

import pytest
import torch

from ddpm_fast import GaussianDiffusion, UNet
from ddpm_fast.evaluation import bits_per_dim, t_strata


@pytest.mark.parametrize("T", [2, 3, 4, 7, 12, 50, 1000, 4000])
def test_strata_cover_every_t_once(T):
    for k in sorted({1, 2, 3, 5, 10, 99, 100, T - 2, T - 1, T, 3 * T} - {0, -1}):
        strata = t_strata(k, T)
        ts = [t for lo, hi in strata for t in range(lo, hi)]
        assert ts == list(range(1, T)), (k, T)
        assert len(strata) == min(k, T - 1)
        assert all(hi - lo == 1 for lo, hi in strata[: k // 2])  # the head: every t alone


def test_no_strata_is_refused():
    with pytest.raises(ValueError, match="--bpd-t"):
        t_strata(0, 1000)


def fake_terms(monkeypatch, f, seen=None):
    """Patch GaussianDiffusion.vb_terms_bpd to f(t, image index) (images carry their index)."""
    def terms(self, model, x0, t, variance="posterior", noise=None):
        if seen is not None:
            seen.append(t.clone())
        return f(t.double(), x0.flatten(1)[:, 0].double()).float()
    monkeypatch.setattr(GaussianDiffusion, "vb_terms_bpd", terms)


def images(n: int) -> torch.Tensor:
    """n one-pixel "images" whose value is their index (the prior's term is then per image too)."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n


@pytest.fixture
def setup():
    return UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=()), GaussianDiffusion("linear", 1000)


def steep(t, i):
    """Falls as 1/t^2 as the real terms do, with a ripple and a part that differs by image."""
    return 1 / t.clamp(min=1) ** 2 + 1e-3 * torch.sin(t / 7) + 1e-4 * i


def test_every_t_is_the_exact_sum(setup, monkeypatch):
    model, d = setup
    seen = []
    fake_terms(monkeypatch, steep, seen)
    x0 = images(10)
    r = bits_per_dim(model, d, x0, batch_size=4, t_samples=None)
    idx = x0.flatten().double()
    per_image = sum(steep(torch.tensor(float(t)), idx) for t in range(1, 1000))
    assert r["t_samples"] == 999
    assert r["kl"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert r["decoder"] == pytest.approx(steep(torch.tensor(0.0), idx).mean().item(), rel=1e-6)
    totals = per_image + steep(torch.tensor(0.0), idx) + d.prior_bpd(x0).double()
    assert r["total"] == pytest.approx(totals.mean().item(), rel=1e-6)
    assert r["std_err"] == pytest.approx((totals.std() / math.sqrt(10)).item(), rel=1e-4)
    # each batch: t = 0, then every t once
    for batch in (slice(0, 1000), slice(1000, 2000), slice(2000, 3000)):
        assert [int(t[0]) for t in seen[batch]] == list(range(1000))


def test_strata_estimate_weighs_each_drawn_t_by_its_width(setup, monkeypatch):
    model, d = setup
    seen = []
    fake_terms(monkeypatch, steep, seen)
    x0 = images(6)
    r = bits_per_dim(model, d, x0, batch_size=6, t_samples=20)
    strata = t_strata(20, 1000)
    drawn = seen[1:]  # after the decoder's t = 0
    assert r["t_samples"] == 20 and len(drawn) == 20
    idx = x0.flatten().double()
    kl = torch.zeros(6, dtype=torch.float64)
    for (lo, hi), t in zip(strata, drawn):
        assert ((t >= lo) & (t < hi)).all()
        kl += (hi - lo) * steep(t.double(), idx)
    assert r["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert len({tuple(t.tolist()) for t in drawn[10:]}) > 1  # the tail's t are drawn, per image


def test_strata_estimate_is_unbiased_where_a_grid_is_not(setup, monkeypatch):
    """Over many images the estimate lands within a few standard errors of the exact sum; k evenly
    spaced t scaled by (T-1)/k (the estimate before) is off by several times the sum itself."""
    model, d = setup
    fake_terms(monkeypatch, lambda t, i: steep(t, torch.zeros_like(i)))
    x0 = torch.zeros(4096, 1, 1, 1)  # the same image: the spread is the draws of t alone
    exact = sum(steep(torch.tensor(float(t)), torch.tensor(0.0)).item() for t in range(1, 1000))
    r = bits_per_dim(model, d, x0, batch_size=1024, t_samples=10, seed=3)
    assert 0 < r["std_err"] < 0.01 * exact
    assert abs(r["kl"] - exact) < 4 * r["std_err"]
    ts = torch.linspace(1, 999, 10).round()
    grid = (steep(ts, torch.zeros_like(ts)).sum() * 999 / 10).item()
    assert grid > 5 * exact


def test_bits_per_dim_of_a_model_is_finite_and_the_terms_add_up():
    d = GaussianDiffusion("linear", 20)
    model = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    r = bits_per_dim(model, d, x0, t_samples=5)
    assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("decoder", "kl", "prior", "total", "std_err"))
    assert r["total"] == pytest.approx(r["decoder"] + r["kl"] + r["prior"])
    assert r["t_samples"] == 5


def test_bits_per_dim_is_the_same_whatever_the_batch_size():
    """Each image draws its own t in each stratum and its own noise (evaluation.image_generator), so
    --batch-size only splits the work: every figure is the same at any batch size, and another seed
    draws another estimate."""
    d = GaussianDiffusion("linear", 30)
    model = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,))
    x0 = torch.rand(7, 3, 8, 8) * 2 - 1
    whole = bits_per_dim(model, d, x0, batch_size=64, t_samples=6, seed=2)
    for batch_size in (1, 3):
        split = bits_per_dim(model, d, x0, batch_size=batch_size, t_samples=6, seed=2)
        assert split == pytest.approx(whole, rel=1e-5)
    assert bits_per_dim(model, d, x0, batch_size=64, t_samples=6, seed=3)["kl"] != pytest.approx(whole["kl"], rel=1e-4)


def test_the_benchmark_measures_the_same_estimate():
    """benchmarks.bpd_estimate re-draws t over a fixed table of terms: its stratified estimate lands on
    the exact sum (row 0, the decoder, left out) and the evenly spaced grid does not."""
    from benchmarks.bpd_estimate import evenly_spaced, stratified

    gen = torch.Generator().manual_seed(0)
    t = torch.arange(1000, dtype=torch.float64)
    L = (1 / t.clamp(min=1) ** 2)[:, None] * (1 + 0.2 * torch.rand(1000, 16, generator=gen, dtype=torch.float64))
    L[0] = 99.0
    exact = L[1:].mean(1).sum().item()
    est = stratified(L, 100, 200, seed=1)
    assert 0 < est.std() < 0.01 * exact and abs(est.mean().item() - exact) < 4 * est.std().item() / 200**0.5
    ts = torch.linspace(1, 999, 100).round().long()
    assert evenly_spaced(L, 100) == pytest.approx(L[ts].mean(1).sum().item() * 999 / 100) and evenly_spaced(L, 100) > 2 * exact
