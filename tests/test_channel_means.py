"""The prior on the images' channel means (channel_means.py) and the sampler's reading of x0's means
with it: the statistics against a hand computation, the posterior against a regression on draws from
the model it assumes, every solver's chain against a plain-PyTorch reading wrapped around the model,
and when the default turns it on."""
import pytest
import torch

from ddpm_fast import FastSampler, UNet
from ddpm_fast.channel_means import ChannelMeans, prior_for
from ddpm_fast.diffusion import GaussianDiffusion
from ddpm_fast.presets import preset_config


def test_the_statistics_of_images_and_their_round_trip():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 5, 9, generator=g) * 2 - 1
    cm = ChannelMeans.of(images)
    m = images.double().mean((2, 3))
    centred = m - m.mean(0)
    assert cm.images == 7
    assert torch.allclose(torch.tensor(cm.mu, dtype=torch.float64), m.mean(0))
    assert torch.allclose(torch.tensor(cm.cov, dtype=torch.float64), centred.T @ centred / 6)
    assert ChannelMeans.from_dict(cm.to_dict()) == cm and ChannelMeans.from_dict(None) is None
    assert len(ChannelMeans.of(images[:, :1]).cov) == 1  # one channel: a 1x1 covariance
    one = ChannelMeans.of(images[:1])  # a one-image set: its means, no spread
    assert torch.allclose(torch.tensor(one.mu, dtype=torch.float64), m[0]) and not torch.tensor(one.cov).any()
    with pytest.raises(ValueError, match="N >= 1"):
        ChannelMeans.of(images[:0])


def test_the_reading_is_the_best_linear_one_of_draws_from_the_prior():
    """E[m0 | m_t] of a joint Gaussian is linear in m_t: least squares on many draws of
    m_t = alpha m0 + sigma n, n ~ N(0, I / pixels), recovers each row's gain and offset."""
    g = torch.Generator().manual_seed(1)
    root = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3
    cm = ChannelMeans((0.2, -0.1, 0.05), tuple(map(tuple, (root @ root.T).tolist())), 100)
    alphas, pixels, n = [0.95, 0.6, 0.1], 7, 200_000
    sigmas = [(1 - a * a) ** 0.5 for a in alphas]
    gain, offset = cm.reading(alphas, sigmas, pixels)
    mu = torch.tensor(cm.mu, dtype=torch.float64)
    for e, (a, s) in enumerate(zip(alphas, sigmas)):
        m0 = mu + torch.randn(n, 3, generator=g, dtype=torch.float64) @ root.T
        m_t = a * m0 + s * torch.randn(n, 3, generator=g, dtype=torch.float64) / pixels ** 0.5
        fit = torch.linalg.lstsq(torch.cat([m_t, torch.ones(n, 1, dtype=torch.float64)], 1), m0).solution
        assert torch.allclose(gain[e], fit[:3].T, atol=0.02), (e, gain[e], fit[:3].T)
        assert torch.allclose(offset[e], fit[3], atol=0.02), (e, offset[e], fit[3])


class ReadMeans(torch.nn.Module):
    """The reading as a plain wrapper of an eps model: the network's x0, clipped, its channel means
    set to the Gaussian posterior (solved per image), and the noise that reads as that x0. `alpha_of`:
    each model time's alpha where the chain's noise level is not the training step's (Karras sigmas
    are rounded to a step for the model's input only)."""

    def __init__(self, model, diffusion, cm: ChannelMeans, alpha_of: dict | None = None):
        super().__init__()
        self.model, self.cm, self.alpha_of = model, cm, alpha_of
        self.abar = diffusion.alphas_cumprod.double()

    def forward(self, x, t):
        eps = self.model(x, t).double()
        abar = self.abar[t] if self.alpha_of is None else torch.tensor([self.alpha_of[int(i)] ** 2 for i in t],
                                                                        dtype=torch.float64)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = ((x.double() - s[:, None, None, None] * eps) / a[:, None, None, None]).clamp(-1, 1)
        mu, cov = torch.tensor(self.cm.mu, dtype=torch.float64), torch.tensor(self.cm.cov, dtype=torch.float64)
        pixels = x.shape[-1] * x.shape[-2]
        m0 = torch.stack([mu + a[i] * cov @ torch.linalg.solve(a[i] ** 2 * cov + s[i] ** 2 / pixels * torch.eye(3),
                                                                 x[i].double().mean((1, 2)) - a[i] * mu)
                          for i in range(len(x))])
        x0 = x0 + (m0 - x0.mean((2, 3)))[..., None, None]
        return ((x.double() - a[:, None, None, None] * x0) / s[:, None, None, None]).float()


@pytest.mark.parametrize("method, steps, spacing", [("dpmpp_2m_sde", 6, "karras"), ("dpmpp_2m_sde", 6, "linspace"),
                                                    ("ddim", 5, None), ("unipc", 5, None), ("ddpm", 9, None)])
def test_every_solver_reads_the_means_as_the_plain_wrapper_does(method, steps, spacing):
    """The scheduler's reading (float32 rows on the device, no host read) against the wrapper above
    under the plain update, from one x_T and one noise draw, on a model and prior of random weights."""
    torch.manual_seed(0)
    model = UNet(**preset_config("tiny", image_size=8, ch_mult=(1, 2), attn_res=())).eval()
    g = torch.Generator().manual_seed(2)
    cm = ChannelMeans.of(torch.rand(40, 3, 8, 8, generator=g) * 1.6 - 0.8)
    diffusion = GaussianDiffusion(timesteps=60, channel_means=cm)
    x_T = torch.randn(3, 3, 8, 8, generator=g)
    kw = dict(method=method, steps=steps, spacing=spacing, dtype=torch.float32)
    sampler = FastSampler(model, diffusion, mean_prior=True, **kw)
    ours = sampler.sample(3, 8, generator=torch.Generator().manual_seed(3), x_T=x_T)
    sched = sampler.scheduler
    alpha_of = {int(t): float(a) for t, a in zip(sched.timesteps, sched._x0_coefs[:, 2])} \
        if spacing == "karras" else None
    ref = FastSampler(ReadMeans(model, diffusion, cm, alpha_of), diffusion, channels=3, mean_prior=False, **kw)
    want = ref.sample(3, 8, generator=torch.Generator().manual_seed(3), x_T=x_T)
    plain = FastSampler(model, diffusion, mean_prior=False, **kw).sample(
        3, 8, generator=torch.Generator().manual_seed(3), x_T=x_T)
    assert torch.allclose(ours, want, atol=2e-4), (ours - want).abs().max()
    assert not torch.allclose(ours, plain, atol=1e-2)  # the reading changes the chain


def test_colourless_means_are_grey_to_within_a_level():
    g = torch.Generator().manual_seed(4)
    grey = torch.rand(50, 1, 6, 6, generator=g).expand(-1, 3, -1, -1) * 2 - 1
    assert ChannelMeans.of(grey).colourless()
    quarter_level = torch.randn(50, 3, 1, 1, generator=g) * 0.5 / 255  # [-1, 1] is 255 levels over 2
    assert ChannelMeans.of(grey + quarter_level).colourless()
    assert not ChannelMeans.of(grey + torch.randn(50, 3, 1, 1, generator=g) * 4 / 255).colourless()  # a spread
    assert not ChannelMeans.of(grey + torch.tensor([0.05, 0.0, 0.0])[:, None, None]).colourless()  # a cast
    assert not ChannelMeans.of(grey[:, :1]).colourless()  # one channel: no colour to read


def test_the_default_reads_the_means_where_the_prior_is_exact_and_the_output_cannot_see_them():
    """On by default for colourless data (the prior is exact: no colour whatever the image shows) and
    a model that cannot see the means; off for colour data, whose means a means-only prior guesses
    blind to the image (it cost KID on the emoji glyphs), and for models that see the means."""
    g = torch.Generator().manual_seed(5)
    grey = ChannelMeans.of((torch.rand(8, 1, 8, 8, generator=g) * 2 - 1).expand(-1, 3, -1, -1))
    colour = ChannelMeans.of(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1)
    small = dict(image_size=8, ch_mult=(1, 2), attn_res=())
    tiny = UNet(**preset_config("tiny", **small))  # one channel a group in its output norm
    eps = GaussianDiffusion(timesteps=50, channel_means=grey)
    assert tiny.output_hides_means() and prior_for(tiny, eps) is grey
    assert prior_for(tiny, eps, False) is None
    coloured = GaussianDiffusion(timesteps=50, channel_means=colour)
    assert prior_for(tiny, coloured) is None and prior_for(tiny, coloured, True) is colour
    for model in (UNet(**preset_config("tiny", **small, num_groups=8)),
                  UNet(**preset_config("tiny", **small, mean_skip=True))):
        assert not model.output_hides_means() and prior_for(model, eps) is None and prior_for(model, eps, True) is grey
    assert prior_for(tiny, GaussianDiffusion(timesteps=50, prediction="v", channel_means=grey)) is None
    assert prior_for(tiny, GaussianDiffusion(timesteps=50)) is None  # no recorded prior: the plain update
    assert prior_for(lambda x, t: x, eps) is None  # any other callable
    with pytest.raises(ValueError, match="--mean-prior"):
        prior_for(tiny, GaussianDiffusion(timesteps=50), True)


def test_the_prior_is_estimated_from_a_seeded_draw_of_the_train_split():
    """train records ChannelMeans.of(load_sample(...)): n distinct images of the split, drawn by the
    seed (a folder's sorted order may run class by class), all of them when the split is smaller."""
    from ddpm_fast.data import load_images, load_sample

    split = load_images(None, 8, "train")
    flat = {tuple(im.flatten().tolist()) for im in split}
    a, b = load_sample(None, 8, 40, seed=0), load_sample(None, 8, 40, seed=1)
    assert len(a) == 40 and len({tuple(im.flatten().tolist()) for im in a}) == 40
    assert all(tuple(im.flatten().tolist()) in flat for im in torch.cat([a, b]))
    assert not torch.equal(a, b) and torch.equal(a, load_sample(None, 8, 40, seed=0))
    assert len(load_sample(None, 8, 10 ** 6)) == len(split)
