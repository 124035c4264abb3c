"""benchmarks.grey_tint: its hand-stepped chain is the library's sampler (so each variant changes one
part of the real thing), and --brief writes the rows it names, each figure in range."""
import json

import torch

from benchmarks import grey_tint
from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.presets import preset_config


def tiny_model():
    torch.manual_seed(0)
    cfg = preset_config("tiny", image_size=8, ch_mult=(1, 2), attn_res=())
    return UNet(**cfg).eval(), cfg


def test_the_chain_is_the_library_sampler():
    model, _ = tiny_model()
    diffusion = GaussianDiffusion("linear", 50)
    for kw in ({}, {"chroma_ode": True}):
        got = grey_tint.chain(model, diffusion, 3, 8, 4, **kw)
        want = FastSampler(model, diffusion, backend="torch", cuda_graph=False, dtype=torch.float32, **kw).sample(
            3, 8, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(got, want)


def test_brief_writes_its_rows(tmp_path, monkeypatch):
    model, cfg = tiny_model()
    torch.save({"config": {"model": cfg, "schedule": "linear", "timesteps": 50, "data": None},
                "model": model.state_dict(), "ema": None}, tmp_path / "checkpoint.pt")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert grey_tint.main(["--ckpt", str(tmp_path), "--brief", "--samples", "4", "--images", "4"]) == 0
    run = json.loads((tmp_path / "out" / "grey_tint.json").read_text())["runs"][0]
    assert list(run["samplers"]) == list(grey_tint.BRIEF)
    for figures in run["samplers"].values():  # a uniform tint is at most the pixels' cast
        assert 0 <= figures["hue"] <= figures["cast"] + 1e-9 and figures["contrast"] > 0
