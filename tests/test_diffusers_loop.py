"""benchmarks.diffusers_loop, the peer of every CPU comparison: it trains as train_unconditional
does, in train mode, so a preset's dropout runs in its step as in ours."""
import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks.diffusers_loop import DiffusersLoop  # noqa: E402
from ddpm_fast import presets  # noqa: E402


def test_the_peer_trains_with_dropout_live_and_hands_out_an_eval_ema_copy(monkeypatch):
    # a small model with dropout (the presets with it are 25M parameters and up)
    monkeypatch.setitem(presets.PRESETS, "tiny_dropout", dict(image_size=16, ch=32, ch_mult=(1, 2), attn_res=(8,),
                                                                num_res_blocks=1, dropout=0.5))
    loop = DiffusersLoop("tiny_dropout", steps=4, seed=0)
    assert all(m.training for m in loop.unet.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in loop.unet.modules())  # the resnets'
    # Train mode is what makes the step stochastic: one input, two different outputs.
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    assert not torch.equal(loop.unet(x, t).sample, loop.unet(x, t).sample)
    loop.step(torch.rand(2, 3, 16, 16) * 2 - 1)
    ema = loop.ema_unet()
    assert not ema.training and torch.equal(ema(x, t).sample, ema(x, t).sample)
    assert loop.unet.training  # handing out the EMA copy leaves the loop training
