"""Prediction targets and loss weightings against their closed forms (and diffusers, where it has
them): the target of each prediction type, its inversion to x0, the weights of min-SNR and of the
ELBO (tied to Ho et al.'s KL terms), offset noise and zero terminal SNR."""
import math

import pytest
import torch

from ddpm_fast import GaussianDiffusion

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def draws(d, x0, seed=0):
    """What d.loss draws from a generator seeded `seed`: (x_t, t, noise, abar)."""
    return d.training_inputs(x0, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw, name", [({}, "eps MSE"), (dict(prediction="v"), "v MSE"),
                                      (dict(loss_weight="min_snr"), "min-SNR-5 weighted eps MSE"),
                                      (dict(prediction="x0", loss_weight="min_snr", snr_gamma=20.0),
                                       "min-SNR-20 weighted x0 MSE"),
                                      (dict(prediction="v", loss_weight="elbo"), "ELBO-weighted v MSE"),
                                      (dict(loss_weight="min_snr", min_snr_floor=0.1),
                                       "min-SNR-5 (floor 0.1) weighted eps MSE")])
def test_loss_name_says_target_and_weight(kw, name):
    assert GaussianDiffusion(**kw).loss_name == name


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_its_inverse(prediction):
    d = GaussianDiffusion("cosine", 50, prediction=prediction)
    x0 = torch.rand(7, 3, 5, 3) * 2 - 1
    x_t, t, noise, abar = draws(d, x0)
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(abar, d.alphas_cumprod[t].float())
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    want = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(d.target(x0, noise, abar), want)
    torch.testing.assert_close(d.predict_x0(x_t, abar, want), x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(d.predict_eps(x_t, abar, want), noise, rtol=1e-4, atol=2e-4)


def test_v_target_is_diffusers_velocity():
    from diffusers import DDPMScheduler

    d = GaussianDiffusion("linear", 1000, prediction="v")
    sched = DDPMScheduler(num_train_timesteps=1000, trained_betas=d.betas.numpy())
    x0, noise = torch.randn(2, 4, 3, 6, 6)
    t = torch.tensor([0, 17, 500, 999])
    want = sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(d.target(x0, noise, d.alphas_cumprod[t].float()), want, rtol=1e-5, atol=1e-5)


def weighted_mse(out, target, w):
    return ((out - target).square().flatten(1).mean(1) * w).mean()


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "min_snr_floor", "elbo"])
def test_loss_is_the_weighted_target_mse(prediction, weighting):
    weight = dict(loss_weight="min_snr", min_snr_floor=0.3) if weighting == "min_snr_floor" else \
        dict(loss_weight=weighting)
    d = GaussianDiffusion("linear", 40, prediction=prediction, snr_gamma=3.0, **weight)
    x0 = torch.rand(9, 3, 4, 4) * 2 - 1
    model = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # noqa: E731
    got = d.loss(model, x0, torch.Generator().manual_seed(5))
    x_t, t, noise, _ = draws(d, x0, seed=5)
    abar = d.alphas_cumprod.double()
    snr = abar / (1 - abar)
    if weighting == "uniform":
        w_x0 = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction]
    elif weighting == "min_snr":  # Hang et al.: min(SNR, gamma) on the x0 error
        w_x0 = snr.clamp(max=3.0)
    elif weighting == "min_snr_floor":  # never under 0.3 of the uniform eps weight (SNR on the x0 error)
        w_x0 = torch.where(snr.clamp(max=3.0) < 0.3 * snr, 0.3 * snr, snr.clamp(max=3.0))
        assert (w_x0 > snr.clamp(max=3.0)).any() and (w_x0 == snr.clamp(max=3.0)).any()  # the floor acts, not always
    else:  # the bound: 0.5 (SNR(t-1) - SNR(t)) on the x0 error, t = 0 as t = 1, mean 1 over t
        snr_prev = torch.cat([snr.new_tensor([math.inf]), snr[:-1]])
        w_x0 = 0.5 * (snr_prev - snr)
        w_x0[0] = w_x0[1]
        w_x0 = w_x0 / w_x0.mean()
    # a weight on the x0 error, in units of the target's error
    w = w_x0 / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction]
    a = abar[t].view(-1, 1, 1, 1).float()
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    want = weighted_mse(model(x_t, t), target, w[t].float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_elbo_weight_is_the_variational_bound():
    """For t >= 1, Ho et al.'s L_{t-1} (a KL between Gaussians, vb_terms_bpd) equals
    0.5 (SNR(t-1) - SNR(t)) times the x0 error: the unnormalised ELBO weight."""
    d = GaussianDiffusion("linear", 100)
    x0 = torch.rand(4, 3, 4, 4) * 1.6 - 0.8
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 50, 99])
    r = (d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])).sqrt().float().view(-1, 1, 1, 1)
    # an x0 error of 0.05 sin(3 x_t) at every t: the predictions stay in [-1, 1], where the KL is unclipped
    eps_model = lambda x, tt: noise + 0.05 * r * torch.sin(3 * x)  # noqa: E731
    kl_bits = d.vb_terms_bpd(eps_model, x0, t, variance="posterior", noise=noise)
    abar = d.alphas_cumprod[t].float()
    x_t = d.q_sample(x0, t, noise)
    x0_err = (d.predict_x0(x_t, abar, eps_model(x_t, t)) - x0).square().flatten(1).mean(1)
    snr = (d.alphas_cumprod / (1 - d.alphas_cumprod)).double()
    w = 0.5 * (snr[t - 1] - snr[t])
    torch.testing.assert_close((kl_bits * math.log(2)).double(), w * x0_err.double(), rtol=2e-3, atol=1e-7)


def test_x0_mse_is_one_unit_for_every_target():
    """A model that is right for its target has zero x0 error whatever it predicts; the x0 error
    of the same wrong x0 guess is the same number for every target."""
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    errors = []
    for prediction in PREDICTIONS:
        d = GaussianDiffusion("cosine", 30, prediction=prediction)
        guess = 0.5 * x0  # the predicted x0, expressed as this target
        x_t, t, noise, abar = draws(d, x0, seed=3)
        a = abar.view(-1, 1, 1, 1)
        as_target = {"epsilon": (x_t - a.sqrt() * guess) / (1 - a).sqrt(), "sample": guess,
                     "v_prediction": (a.sqrt() * x_t - guess) / (1 - a).sqrt()}[prediction]
        errors.append(float(d.x0_mse(lambda x, tt: as_target, x0, torch.Generator().manual_seed(3))))
    want = float((0.5 * x0 - x0).square().mean())
    assert errors == pytest.approx([want] * 3, rel=1e-4)


class WrongEps(torch.nn.Module):
    """A model whose eps, sin(3 x_t) + t / 10, is wrong, expressed as its diffusion's target."""

    def __init__(self, d):
        super().__init__()
        self.d, self.unused = d, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t):
        a = self.d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        eps = torch.sin(3 * x_t) + 0.1 * t.view(-1, 1, 1, 1)
        x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        as_target = {"epsilon": eps, "sample": x0_hat, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0_hat}
        return as_target[self.d.prediction]


@pytest.mark.parametrize("loss_weight", ("uniform", "min_snr", "elbo"))
def test_heldout_eps_mse_is_one_unit_for_every_target_and_weight(loss_weight):
    """evaluate's eps-MSE is the unweighted eps error whatever the run predicts and however it
    weighted its loss: the same wrong eps guess, expressed as each target, gives one number, the
    one computed here from the draws by hand (the weighted training loss does not)."""
    from ddpm_fast.evaluation import heldout_mse, image_generator

    x0 = torch.rand(10, 3, 5, 4) * 2 - 1
    figures = []
    for prediction in PREDICTIONS:
        d = GaussianDiffusion("linear", 40, prediction=prediction, loss_weight=loss_weight)
        model = WrongEps(d)
        want, n = 0.0, 0
        for draw in range(2):
            for i in range(len(x0)):  # each image's own draw (evaluation.image_generator)
                x_t, t, noise, _ = d.training_inputs(x0[i:i + 1], image_generator(0, f"mse{draw}", i, x0.device))
                want += float((torch.sin(3 * x_t) + 0.1 * t.view(-1, 1, 1, 1) - noise).square().mean())
                n += 1
        figures.append(heldout_mse(model, d, x0, batch_size=4, draws=2, seed=0)[0])
        assert figures[-1] == pytest.approx(want / n, rel=1e-4), prediction
        if (prediction, loss_weight) != ("epsilon", "uniform"):
            assert float(d.loss(model, x0, torch.Generator().manual_seed(0))) != pytest.approx(figures[-1], rel=1e-2)
    assert figures == pytest.approx([figures[0]] * 3, rel=1e-4)


def test_heldout_eps_mse_std_err_is_over_the_images_and_quartiles_over_the_draws():
    """Its standard error is that of each image's mean over its draws, and each quarter of t's
    figure the mean of the draws whose t fell in it, computed here by hand; one image has no
    standard error, and a quarter no draw fell in no figure."""
    from ddpm_fast.evaluation import heldout_mse, image_generator

    d = GaussianDiffusion("linear", 40)
    model = WrongEps(d)
    x0 = torch.rand(7, 3, 5, 4) * 2 - 1
    per_image = torch.zeros(7, dtype=torch.float64)
    by_quarter = [[] for _ in range(4)]
    for draw in range(3):
        for i in range(7):
            x_t, t, noise, _ = d.training_inputs(x0[i:i + 1], image_generator(0, f"mse{draw}", i, x0.device))
            err = (torch.sin(3 * x_t) + 0.1 * t.view(-1, 1, 1, 1) - noise).square().mean()
            per_image[i] += err.double() / 3
            by_quarter[int(t) // 10].append(err.item())  # T = 40: a quarter is 10 steps
    mean, std_err, by_quartile = heldout_mse(model, d, x0, batch_size=3, draws=3, seed=0)
    assert mean == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert std_err == pytest.approx((per_image.std() / 7 ** 0.5).item(), rel=1e-4)
    assert all(by_quarter), "a quarter without a draw: the seed no longer covers the four"
    assert by_quartile == pytest.approx([sum(q) / len(q) for q in by_quarter], rel=1e-5)
    one = heldout_mse(model, d, x0[:1], draws=2)
    assert one.std_err is None and sum(q is None for q in one.by_quartile) >= 2  # two draws, four quarters
    with pytest.raises(ValueError, match="reduction"):
        d.eps_mse(model, x0, reduction="sum")


def test_heldout_eps_mse_is_the_same_whatever_the_batch_size():
    """--batch-size only splits the work: each image draws its own (t, noise), so every figure is the
    same at any batch size (it was not while one generator ran through the batches in turn), and
    another seed draws other figures."""
    from ddpm_fast.evaluation import heldout_mse

    d = GaussianDiffusion("linear", 40, offset_noise=0.1)
    model = WrongEps(d)
    x0 = torch.rand(11, 3, 5, 4) * 2 - 1
    whole = heldout_mse(model, d, x0, batch_size=64, draws=3, seed=5)
    for batch_size in (1, 4, 10):
        split = heldout_mse(model, d, x0, batch_size=batch_size, draws=3, seed=5)
        assert split.mean == pytest.approx(whole.mean, rel=1e-6) and split.std_err == pytest.approx(whole.std_err)
        assert split.by_quartile == pytest.approx(whole.by_quartile, rel=1e-6)
    assert heldout_mse(model, d, x0, batch_size=64, draws=3, seed=6).mean != pytest.approx(whole.mean, rel=1e-3)


@pytest.mark.parametrize("schedule", ("linear", "continuous"))
def test_quartile_splits_the_model_times_into_four_quarters(schedule):
    d = GaussianDiffusion(schedule, 40)
    t = torch.tensor([0, 9, 10, 19.5, 20, 29, 30, 39, 39.9])
    t = t if schedule == "continuous" else t.long()
    want = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert d.quartile(t).tolist() == want
    _, t_model, _, _ = d.training_inputs(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0))
    counts = torch.bincount(d.quartile(t_model), minlength=4)
    assert len(counts) == 4 and counts.min() > 850  # uniform t (or alpha-bar): about 1,000 a quarter


def test_offset_noise_adds_a_per_channel_constant():
    d = GaussianDiffusion("linear", 10, offset_noise=0.5)
    _, _, noise, _ = draws(d, torch.zeros(4000, 3, 8, 8))
    channel_means = noise.mean((2, 3))  # a constant per (image, channel) of std 0.5, plus N(0, 1/64)
    assert channel_means.std().item() == pytest.approx((0.25 + 1 / 64) ** 0.5, rel=0.05)
    plain = GaussianDiffusion("linear", 10)
    assert draws(plain, torch.zeros(4000, 3, 8, 8))[2].mean((2, 3)).std().item() == pytest.approx(1 / 8, rel=0.05)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    d = GaussianDiffusion("linear", 1000, prediction="v", zero_terminal_snr=True)
    ref = torch.cumprod(1 - rescale_zero_terminal_snr(GaussianDiffusion("linear", 1000).betas), 0)
    torch.testing.assert_close(d.alphas_cumprod[:-1], ref[:-1], rtol=1e-5, atol=1e-9)
    assert ref[-1] == 0 and d.alphas_cumprod[-1] == 2.0**-24  # held just above 0, as diffusers' samplers do
    assert torch.isfinite(d.posterior_variance).all() and (d.betas <= 1).all()


@pytest.mark.parametrize("kw, needle", [
    (dict(prediction="score"), "--prediction"),
    (dict(loss_weight="p2"), "--loss-weight"),
    (dict(zero_terminal_snr=True), "--zero-terminal-snr"),
    (dict(schedule="continuous", loss_weight="elbo"), "--loss-weight elbo"),
    (dict(snr_gamma=0.0), "--snr-gamma"),
    (dict(loss_weight="min_snr", min_snr_floor=1.5), r"--min-snr-floor must be in \[0, 1\]"),
    (dict(min_snr_floor=0.1), "--min-snr-floor is --loss-weight min_snr's, not uniform's"),
])
def test_bad_objectives_name_the_flag(kw, needle):
    with pytest.raises(ValueError, match=needle):
        GaussianDiffusion(**kw)


def test_from_config_fills_what_an_old_checkpoint_lacks():
    d = GaussianDiffusion.from_config({"schedule": "cosine", "timesteps": 20, "model": {}})
    assert (d.schedule, d.timesteps, d.prediction, d.loss_weight) == ("cosine", 20, "epsilon", "uniform")
    d = GaussianDiffusion.from_config({"schedule": "linear", "timesteps": 20, "prediction": "x0"})
    assert d.prediction == "sample"


@pytest.mark.slow
def test_v_and_x0_models_sample_as_well_as_eps(tmp_path):
    """The tiny model trained for a few hundred steps with each target: every sampler family reads
    the target from the checkpoint, and the v and x0 models' samples are as close to the data as the
    eps model's (colour statistics of the images), with a held-out x0 error no worse than twice it."""
    from ddpm_fast import FastSampler
    from ddpm_fast.data import load_images
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.loop import eval_loss, fit
    from ddpm_fast.training.run import build_run

    data = load_images(None, 16, "test")
    want = torch.cat([data.mean((0, 2, 3)), data.std((0, 2, 3))])
    gaps, errors = {}, {}
    for prediction in ("eps", "v", "x0"):
        cfg = TrainConfig(image_size=16, ch_mult=(1, 2), attn_res=(8,), batch_size=16, steps=300, lr=2e-3, warmup=20,
                          workers=0, prediction=prediction, sample_n=4, sample_every=10**6, save_every=10**6,
                          out=str(tmp_path / prediction))
        run = build_run(cfg)
        fit(run)
        errors[prediction] = eval_loss(run, "x0_mse")
        for method in ("ddim", "dpmpp_2m", "unipc", "heun"):
            images = FastSampler(run.ema.model, run.diffusion, method=method, steps=10).sample(
                128, 16, generator=torch.Generator().manual_seed(0))
            stats = torch.cat([images.mean((0, 2, 3)), images.std((0, 2, 3))])
            gaps[prediction, method] = float((stats - want).abs().max())
    for method in ("ddim", "dpmpp_2m", "unipc", "heun"):
        for prediction in ("v", "x0"):
            assert gaps[prediction, method] <= max(2 * gaps["eps", method], 0.1), (prediction, method, gaps)
    for prediction in ("v", "x0"):
        assert errors[prediction] <= 2 * errors["eps"], errors
