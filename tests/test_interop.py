"""diffusers interop: the weight mapping is exact both ways (every preset's layout, google/ddpm-cifar10-32's,
diffusers' own defaults), an exported run is a DDPMPipeline folder that samples like ddpm-fast, every
--ckpt loads such folders and our .safetensors files, and what does not map is a named error."""
import importlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

import ddpm_fast  # noqa: E402
from ddpm_fast import PRESETS, GaussianDiffusion, UNet, interop  # noqa: E402
from ddpm_fast.presets import preset_config  # noqa: E402
from ddpm_fast.checkpoint import load_model, load_weights_for_init  # noqa: E402
from ddpm_fast.schedulers import CAN_KEEP_NOISE, SIGMA_MAX, clipped_model_output  # noqa: E402

export_cli = importlib.import_module("ddpm_fast.commands.export")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")

# google/ddpm-cifar10-32's unet/config.json and scheduler/scheduler_config.json, written out (no network).
GOOGLE_UNET = dict(sample_size=32, in_channels=3, out_channels=3, act_fn="silu", attention_head_dim=None,
                   block_out_channels=(128, 256, 256, 256), center_input_sample=False,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
                   flip_sin_to_cos=False, freq_shift=1, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-6,
                   norm_num_groups=32, time_embedding_type="positional")
GOOGLE_SCHEDULER = dict(beta_end=0.02, beta_schedule="linear", beta_start=0.0001, clip_sample=True,
                        num_train_timesteps=1000, trained_betas=None, variance_type="fixed_large")
# diffusers' own defaults (its unconditional training example's layout): [cos, sin] time embedding,
# freq_shift 0, 8-channel attention heads, symmetric downsample padding.
DIFFUSERS_DEFAULTS = dict(sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# A small UNet2DModel that maps, for the error cases to change one field of.
SMALL = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=None, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1)
SMALL_OURS = dict(image_size=8, ch=16, ch_mult=(1, 2), attn_res=(4,), num_res_blocks=1, num_groups=8)


def randomize_norms(module: torch.nn.Module) -> None:
    """GroupNorm affines start at 1 and 0: make them random so the mapping of each is checked."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def assert_same_eps(ours: UNet, unet: UNet2DModel, batch: int = 3) -> None:
    size = ours.config["image_size"]
    x = torch.randn(batch, 3, size, size)
    t = torch.tensor([0, 731, 999, 17][:batch])
    with torch.no_grad():
        a, b = ours.set_backend("torch").eval()(x, t), unet.eval()(x, t).sample
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def small_preset(name: str) -> dict:
    """The preset's block structure (size, levels, attention resolutions, blocks per level), narrow."""
    return preset_config(name, ch=8, num_groups=4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_layout_matches_unet2dmodel_both_ways(name):
    ours = UNet(**small_preset(name))
    randomize_norms(ours)
    unet, _ = interop.to_diffusers(ours, GaussianDiffusion("linear", 10))
    assert_same_eps(ours, unet, batch=3 if ours.config["image_size"] <= 64 else 1)

    theirs = UNet2DModel(**interop.diffusers_config(ours))
    randomize_norms(theirs)
    back, _ = interop.from_diffusers(theirs)
    assert back.config == ours.config
    assert_same_eps(back, theirs, batch=1)


def test_google_ddpm_cifar10_layout_is_cifar32(tmp_path):
    """Its folder loads where a checkpoint is taken, as the cifar32 preset with the original DDPM's
    eps and padding, and the same eps; our model of that config exports to the same UNet2DModel config."""
    theirs = UNet2DModel(**GOOGLE_UNET)
    randomize_norms(theirs)
    DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(**GOOGLE_SCHEDULER)).save_pretrained(tmp_path)
    ours, diffusion, cfg = load_model(tmp_path)
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    # (dropout 0: that config predates diffusers' dropout field)
    assert ours.config == UNet.from_preset("cifar32", norm_eps=1e-6, downsample_padding=0, dropout=0.0).config
    assert (diffusion.schedule, diffusion.timesteps, cfg["variance"], cfg["sample_clip_x0"]) == ("linear", 1000,
                                                                                                 "beta", True)
    assert_same_eps(ours, theirs, batch=1)

    unet, _ = interop.to_diffusers(ours, diffusion)
    assert {k: unet.config[k] for k in GOOGLE_UNET} == GOOGLE_UNET
    assert_same_eps(ours, unet, batch=1)


def test_diffusers_default_layout_maps_both_ways():
    theirs = UNet2DModel(**DIFFUSERS_DEFAULTS)
    assert theirs.config.flip_sin_to_cos and theirs.config.freq_shift == 0 and theirs.config.attention_head_dim == 8
    randomize_norms(theirs)
    ours, _ = interop.from_diffusers(theirs)
    assert ours.config["attn_head_dim"] == 8 and ours.config["freq_shift"] == 0
    assert_same_eps(ours, theirs)
    again, _ = interop.to_diffusers(ours, GaussianDiffusion("linear", 10))  # exported as [sin, cos]
    assert not again.config.flip_sin_to_cos
    assert_same_eps(ours, again)


# -- an exported run ---------------------------------------------------------------------------------------
def make_run(path, schedule="linear", timesteps=20, **config):
    """A checkpoint as training writes it, with different model and EMA weights, in a non-default layout."""
    model_cfg = preset_config("tiny", image_size=16, ch=16, ch_mult=(1, 2), attn_res=(8,), num_groups=8)
    model_cfg |= dict(norm_eps=1e-6, downsample_padding=0, attn_head_dim=8)
    model, ema = UNet(**model_cfg), UNet(**model_cfg)
    randomize_norms(model)
    randomize_norms(ema)
    cfg = dict(model=model_cfg, schedule=schedule, timesteps=timesteps, data=None, sample_clip_x0=True) | config
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg, "step": 1}, path / "checkpoint.pt")
    return model.eval(), ema.eval(), GaussianDiffusion(schedule, timesteps)


@pytest.mark.parametrize("schedule,variance,clip", [("linear", "beta", True), ("cosine", "posterior", False)])
def test_exported_run_is_a_ddpm_pipeline_that_samples_like_ddpm_fast(tmp_path, schedule, variance, clip):
    model, ema, diffusion = make_run(tmp_path / "run", schedule)
    clip_flag = "--clip-x0" if clip else "--no-clip-x0"
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"),
                            "--variance", variance, clip_flag]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    sched = pipe.scheduler
    assert isinstance(sched, DDPMScheduler) and torch.equal(sched.betas, diffusion.betas.float())
    assert (sched.config.variance_type, sched.config.clip_sample, sched.config.prediction_type,
            sched.config.num_train_timesteps) == (interop.VARIANCE_TYPES[variance], clip, "epsilon", 20)
    assert_same_eps(ema, pipe.unet)  # the EMA weights by default

    # The same noise stream: the start noise, then one draw per step (diffusers skips the last, noiseless one).
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=20,
                  output_type="pt").images
    ours = ddpm_fast.sample(ema.set_backend("torch"), diffusion, 2, 16, method="ddpm", variance=variance, clip_x0=clip,
                            dtype=torch.float32,
                            generator=torch.Generator().manual_seed(5))
    # atol: diffusers forms beta_t = 1 - abar_t / abar_(t-1) in float32, ~1e-3 off for the cosine schedule's
    # small early betas; a wrong variance or noise order is off by ~0.1 and more.
    torch.testing.assert_close(images, (ours + 1) / 2, rtol=0, atol=1e-3)

    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--no-ema", "--out", str(tmp_path / "raw")]) == 0
    assert_same_eps(model, UNet2DModel.from_pretrained(tmp_path / "raw" / "unet"))


@pytest.mark.parametrize("name,cls", [("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)])
def test_export_with_another_scheduler(tmp_path, name, cls):
    _, _, diffusion = make_run(tmp_path / "run", "cosine")
    keep = ["--no-use-clipped-model-output"] if name == "ddim" else []  # all a DDPMPipeline's DDIM can do
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"), "--scheduler", name,
                            *keep]) == 0
    sched = DDPMPipeline.from_pretrained(tmp_path / "pipe").scheduler
    assert isinstance(sched, cls) and torch.equal(sched.betas, diffusion.betas.float())
    assert sched.config.prediction_type == "epsilon"
    _, back, _ = load_model(tmp_path / "pipe")  # and it imports, schedule and all
    assert (back.schedule, back.timesteps) == ("cosine", 20)


def test_round_trips_are_bit_identical(tmp_path):
    _, ema, _ = make_run(tmp_path / "run", data="some/images")
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 0
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--safetensors", str(tmp_path / "m.safetensors")]) == 0
    for path in (tmp_path / "pipe", tmp_path / "m.safetensors"):
        model, diffusion, cfg = load_model(path)
        assert model.config == ema.config and (diffusion.schedule, diffusion.timesteps) == ("linear", 20)
        state = model.state_dict()
        assert state.keys() == ema.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    assert cfg["data"] == "some/images"  # the .safetensors file carries the run's config

    theirs = UNet2DModel(**SMALL)  # and diffusers -> ddpm-fast -> diffusers
    again, _ = interop.to_diffusers(*interop.from_diffusers(theirs))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in theirs.state_dict().items())

    config, state, schedule = load_weights_for_init(tmp_path / "pipe")
    assert config == ema.config and schedule == {"schedule": "linear", "timesteps": 20, "prediction": "epsilon",
                                                 "zero_terminal_snr": False}
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())


def test_safetensors_file_loads_without_diffusers(tmp_path, monkeypatch):
    _, ema, _ = make_run(tmp_path / "run")
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--safetensors", str(tmp_path / "m.safetensors")]) == 0
    monkeypatch.setitem(sys.modules, "diffusers", None)  # any import of it now fails
    model, _, _ = load_model(tmp_path / "m.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.state_dict().items())

    from safetensors.torch import save_file

    save_file(ema.state_dict(), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no ddpm-fast config"):
        load_model(tmp_path / "bare.safetensors")


def test_sample_and_evaluate_clis_on_exported_folder(tmp_path):
    """The folder and the file hold the run's EMA weights and schedule: the same seed gives the same
    grid and the same evaluation as the run itself."""
    make_run(tmp_path / "run", timesteps=10)
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 0
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--safetensors", str(tmp_path / "m.safetensors")]) == 0
    grids, evals = [], []
    for i, ckpt in enumerate(("run", "pipe", "m.safetensors")):
        out = tmp_path / f"g{i}.png"
        assert sample_cli.main(["--ckpt", str(tmp_path / ckpt), "--n", "4", "--nrow", "2", "--kernels", "torch",
                                "--out", str(out)]) == 0
        grids.append(torch.from_numpy(np.array(Image.open(out))))
    assert grids[0].shape == (2 * 18 + 2, 2 * 18 + 2, 3) and grids[0].float().std() > 0
    assert all(torch.equal(g, grids[0]) for g in grids[1:])
    for i, ckpt in enumerate(("run", "pipe")):
        assert evaluate_cli.main(["--ckpt", str(tmp_path / ckpt), "--images", "4", "--bpd-images", "2",
                                  "--bpd-t", "2", "--json", str(tmp_path / f"e{i}.json")]) == 0
        r = json.loads((tmp_path / f"e{i}.json").read_text())
        evals.append((r["eps_mse"], r["bits_per_dim"]))
    assert evals[1] == evals[0]


# -- what does not map -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("in_channels", 2), ("out_channels", 1), ("center_input_sample", True), ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"), ("mid_block_scale_factor", 2.0),
    ("resnet_time_scale_shift", "scale_shift"), ("add_attention", False), ("act_fn", "mish"),
    ("block_out_channels", (16, 24)), ("time_embedding_dim", 32),
    ("down_block_types", ("ResnetDownsampleBlock2D", "AttnDownBlock2D")),
    ("up_block_types", ("UpBlock2D", "UpBlock2D")), ("attention_head_dim", 3),
])
def test_unmapped_unet_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"field {field}="):
        interop.from_diffusers(UNet2DModel(**SMALL | {field: value}))


@pytest.mark.parametrize("field,value", [("prediction_type", "score"), ("beta_schedule", "scaled_linear"),
                                         ("variance_type", "learned_range"), ("sample_max_value", 2.0),
                                         ("clip_sample_range", 2.0)])
def test_unmapped_scheduler_names_the_field(field, value):
    thresholding = {"thresholding": True} if field == "sample_max_value" else {}  # a threshold above 1: no clip
    with pytest.raises(ValueError, match=f"field {field}="):
        interop.from_diffusers(UNet2DModel(**SMALL), DDPMScheduler(**{field: value}, **thresholding))


def test_thresholding_at_one_imports_as_the_clip():
    assert interop.schedule_of(DDPMScheduler(thresholding=True, clip_sample=False))["sample_clip_x0"] is True
    assert interop.schedule_of(DPMSolverMultistepScheduler())["sample_clip_x0"] is False


def test_class_conditional_model_maps_both_ways():
    """Our class embedding is diffusers' num_class_embeds one, our null class its last label."""
    torch.manual_seed(0)
    ours = UNet(**SMALL_OURS, num_classes=3)
    with torch.no_grad():
        ours.class_emb.weight.normal_()
    unet, _ = interop.to_diffusers(ours, GaussianDiffusion())
    assert unet.config.num_class_embeds == 4
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([3, 500, 999, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x, t, y), unet.eval()(x, t, class_labels=y).sample, rtol=1e-5, atol=1e-5)
    back, _ = interop.from_diffusers(unet)
    assert back.num_classes == 3
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("prediction,zero_snr", [("v_prediction", False), ("v_prediction", True), ("sample", False)])
def test_prediction_type_and_zero_terminal_snr_travel_with_the_scheduler(prediction, zero_snr):
    d = GaussianDiffusion("cosine", 100, prediction=prediction, zero_terminal_snr=zero_snr)
    _, sched = interop.to_diffusers(UNet(**SMALL_OURS), d)
    assert sched.config.prediction_type == prediction
    _, back = interop.from_diffusers(UNet2DModel(**SMALL), sched)
    assert (back.prediction, back.zero_terminal_snr, back.schedule) == (prediction, zero_snr, "cosine")
    torch.testing.assert_close(back.betas, d.betas, rtol=1e-5, atol=0)


def test_unmapped_folder_and_run_errors(tmp_path, capsys):
    (tmp_path / "cond").mkdir()
    (tmp_path / "cond" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "cond" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="_class_name='UNet2DConditionModel'"):
        load_model(tmp_path / "cond")

    model = UNet(**SMALL_OURS)
    with pytest.raises(ValueError, match="act='hardswish'"):
        interop.to_diffusers(UNet(**SMALL_OURS | dict(act="hardswish")), GaussianDiffusion())
    with pytest.raises(ValueError, match="num_groups=8"):
        interop.to_diffusers(UNet(**SMALL_OURS | dict(ch=4)), GaussianDiffusion())
    with pytest.raises(ValueError, match="norm_out_groups=4 differs"):
        interop.to_diffusers(UNet(**SMALL_OURS | dict(norm_out_groups=4)), GaussianDiffusion())
    with pytest.raises(ValueError, match="mean_skip=True"):
        interop.to_diffusers(UNet(**SMALL_OURS | dict(mean_skip=True)), GaussianDiffusion())
    with pytest.raises(ValueError, match="continuous"):
        interop.to_diffusers(model, GaussianDiffusion("continuous", 10))
    make_run(tmp_path / "run", "continuous")
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 2
    assert "continuous" in capsys.readouterr().err


def test_train_init_from_a_diffusers_folder_fine_tunes_its_weights(tmp_path, capsys):
    """--init-from: the run starts from the folder's weights and schedule, with a fresh optimizer,
    and trains; a class-conditional fine-tune of an unconditional model starts its class embedding fresh."""
    from ddpm_fast.training.config import TrainConfig
    from ddpm_fast.training.run import build_run

    _, ema, _ = make_run(tmp_path / "run", schedule="cosine", timesteps=30)
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 0
    run = build_run(TrainConfig(init_from=str(tmp_path / "pipe"), batch_size=4, steps=2, workers=0,
                                out=str(tmp_path / "ft")))
    assert "initialised from" in capsys.readouterr().out
    assert (run.diffusion.schedule, run.diffusion.timesteps) == ("cosine", 30)
    assert run.net.config == ema.config and run.step == 0 and not run.opt.state
    assert all(torch.equal(run.net.state_dict()[k], v) for k, v in ema.state_dict().items())
    train_cli = importlib.import_module("ddpm_fast.commands.train")
    assert train_cli.main(["--init-from", str(tmp_path / "pipe"), "--batch-size", "4", "--steps", "2", "--workers",
                           "0", "--sample-n", "2", "--class-cond", "--out", str(tmp_path / "ft2")]) == 0
    model, _, cfg = load_model(tmp_path / "ft2")
    assert model.num_classes == 4 and cfg["init_from"] == str(tmp_path / "pipe")


# T: 100 where Karras sigmas would repeat a timestep of 20 (diffusers then loses its place); 20 for
# DDIM, which diffusers steps by T // steps (ours: to the next timestep, the same where that divides).
@pytest.mark.parametrize("name,flags,steps,T,config", [
    ("dpmpp_2m", [], 8, 100, {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}),
    ("ddim", ["--no-use-clipped-model-output"], 20, 20, {"timestep_spacing": "linspace"}),
    # the default sampler, on Karras sigmas as ours takes it by default
    ("dpmpp_2m_sde", ["--use-clipped-model-output"], 10, 100, {"algorithm_type": "sde-dpmsolver++",
                                                                "use_karras_sigmas": True, "solver_order": 2}),
    # Karras sigmas from a higher noise level: a config entry diffusers reads but takes no argument for
    ("dpmpp_2m_sde", ["--use-clipped-model-output", "--sigma-min", "0.2"], 10, 100,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "sigma_min": 0.2, "sigma_max": SIGMA_MAX}),
    # and from a given highest (the T = 100 schedule's largest is 221, above the default start)
    ("dpmpp_2m_sde", ["--use-clipped-model-output", "--sigma-max", "200"], 10, 100,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "sigma_max": 200.0}),
    ("dpmpp_3m_sde", ["--use-clipped-model-output", "--spacing", "trailing"], 9, 100,
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "timestep_spacing": "trailing"}),
    ("dpmpp_3m", ["--spacing", "karras"], 7, 100, {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                   "use_karras_sigmas": True}),
    # linspace, as ours: DDPMScheduler's own default is leading, 7 of 100 steps apart from it
    ("ddpm", [], 7, 100, {"timestep_spacing": "linspace"})])
def test_exported_scheduler_samples_like_ddpm_fast_clip_reading_included(tmp_path, name, flags, steps, T, config):
    """The spacing and the clip reading travel with the folder: DPM-Solver++ clips x0 (thresholding
    at 1) and re-derives eps, as ddpm-fast's dpmpp_2m does by default and its SDE forms with
    --use-clipped-model-output; a DDPMPipeline's DDIM keeps the network's eps, as ddpm-fast's ddim
    with use_clipped_model_output=False. The same noise stream: the pipeline's start noise, then the
    SDE's one draw per step. The other reading samples measurably differently, so the comparison
    can fail."""
    _, ema, diffusion = make_run(tmp_path / "run", timesteps=T)
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"), "--scheduler", name,
                            *flags]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert {k: pipe.scheduler.config[k] for k in config} == config
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=steps,
                  output_type="pt").images
    model = ema.set_backend("torch")
    keep = {"--use-clipped-model-output": True, "--no-use-clipped-model-output": False}
    reading = next((keep[f] for f in flags if f in keep), None)
    spacing = flags[flags.index("--spacing") + 1] if "--spacing" in flags else None
    sigma_min = float(flags[flags.index("--sigma-min") + 1]) if "--sigma-min" in flags else None
    sigma_max = float(flags[flags.index("--sigma-max") + 1]) if "--sigma-max" in flags else None

    def ours(use_clipped_model_output):
        sampler = ddpm_fast.FastSampler(model, diffusion, method=name, steps=steps, spacing=spacing,
                                        sigma_min=sigma_min, sigma_max=sigma_max,
                                        use_clipped_model_output=use_clipped_model_output,
                                        backend="torch", dtype=torch.float32)
        return (sampler.sample(2, 16, generator=torch.Generator().manual_seed(5)) + 1) / 2

    # atol: diffusers' float32 schedule arithmetic, ~1e-3 over 20 steps; the other reading is off by ~1
    torch.testing.assert_close(images, ours(reading), rtol=0, atol=5e-3)
    if name in CAN_KEEP_NOISE:
        rederived = clipped_model_output(name, reading)
        assert (images - ours(not rederived)).abs().max() > 1e-2


def test_a_min_snr_runs_karras_folder_stops_where_ddpm_fast_does(tmp_path):
    """The default highest and lowest sigma of a min-SNR run's chain (schedulers.min_snr_sigma_min) travels with
    the folder as diffusers' sigma_min, and the pipeline samples as ddpm-fast's default does; without
    it the chain differs measurably."""
    _, ema, _ = make_run(tmp_path / "run", timesteps=100, loss_weight="min_snr")
    assert export_cli.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"), "--scheduler",
                            "dpmpp_2m_sde", "--use-clipped-model-output"]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config["sigma_min"] == pytest.approx(0.02 ** 0.5)
    assert pipe.scheduler.config["sigma_max"] == SIGMA_MAX  # ours starts there too (schedulers.sigma_max_of)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
                  output_type="pt").images
    model = ema.set_backend("torch")

    def ours(diffusion):
        sampler = ddpm_fast.FastSampler(model, diffusion, steps=10, use_clipped_model_output=True, backend="torch",
                                        dtype=torch.float32)
        return (sampler.sample(2, 16, generator=torch.Generator().manual_seed(5)) + 1) / 2

    torch.testing.assert_close(images, ours(GaussianDiffusion("linear", 100, loss_weight="min_snr")), rtol=0,
                               atol=5e-3)
    assert (images - ours(GaussianDiffusion("linear", 100))).abs().max() > 1e-2


def test_export_refuses_a_reading_the_folder_cannot_carry(tmp_path, capsys):
    make_run(tmp_path / "run")
    base = ["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"), "--scheduler"]
    assert export_cli.main([*base, "ddim"]) == 2  # ddpm-fast's ddim re-derives; diffusers' cannot
    assert "--no-use-clipped-model-output" in capsys.readouterr().err
    assert export_cli.main([*base, "dpmpp_2m", "--no-use-clipped-model-output"]) == 2
    assert "cannot keep the network's" in capsys.readouterr().err
    assert export_cli.main([*base, "dpmpp_2m_sde"]) == 2  # the SDE's default keeps it
    err = capsys.readouterr().err
    assert "cannot keep the network's (ddpm-fast's default for it)" in err
    assert "--method dpmpp_2m_sde --use-clipped-model-output" in err
    assert export_cli.main([*base, "ddpm", "--spacing", "karras"]) == 2
    assert "--spacing karras is for the sigma-space solvers, not ddpm" in capsys.readouterr().err
    assert export_cli.main([*base, "dpmpp_2m", "--sigma-min", "0.2"]) == 2  # linspace
    assert "--sigma-min is the karras spacing's lowest sigma" in capsys.readouterr().err
    assert export_cli.main([*base, "dpmpp_2m_sde", "--use-clipped-model-output", "--sigma-max", "1e6"]) == 2
    assert "--sigma-max must be in (" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists()
    assert export_cli.main([*base, "ddim", "--no-clip-x0"]) == 0  # no clip: nothing to read
