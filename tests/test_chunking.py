"""chunking: a model's inference calls in chunks of the plan's cap (plan.EVAL_ELEMENTS), the same
outputs as one call; the width the cap divides by, read from ours, diffusers' and wrapped models;
evaluate's held-out figures unchanged under the cap."""
import pytest
import torch

from ddpm_fast import GaussianDiffusion, UNet
from ddpm_fast.chunking import in_chunks, model_width
from ddpm_fast.evaluation import bits_per_dim, heldout_mse
from ddpm_fast.plan import ExecutionPlan


def test_model_width_reads_ours_diffusers_and_wrapped_models():
    from diffusers import UNet2DModel

    ours = UNet.from_preset("tiny", image_size=8, ch=16, ch_mult=(3, 2), attn_res=())
    theirs = UNet2DModel(sample_size=8, block_out_channels=(24, 48), down_block_types=("DownBlock2D",) * 2,
                         up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    assert (model_width(ours), model_width(theirs)) == (48, 24)
    for attr in ("_orig_mod", "module"):  # where torch.compile's and DDP's wrappers keep the model
        wrapped = torch.nn.Module()
        setattr(wrapped, attr, ours)
        assert model_width(wrapped) == 48
    assert model_width(lambda x, t: x) is None


class Out:
    def __init__(self, sample):
        self.sample = sample


@pytest.mark.parametrize("n, cap, calls", [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (3, 3, [3]), (2, 5, [2]), (5, None, [5])])
def test_in_chunks_calls_each_chunk_once_and_joins_them(n, cap, calls):
    """Every input is split alike (x, t and a label), the remainder last; each output element is the
    model's on its own image; an output with .sample is unwrapped, chunked or not."""
    seen = []

    def model(x, t, y):
        seen.append((x.shape[0], t.tolist(), y.tolist()))
        return Out(x * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1))

    width, size = 2, 3
    plan = ExecutionPlan(eval_elements=None if cap is None else cap * width * size ** 2)
    x, t, y = torch.randn(n, 1, size, size), torch.arange(n) + 1.0, torch.arange(n) * 10
    got = in_chunks(model, plan, width)(x, t, y)
    torch.testing.assert_close(got, x * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1), rtol=0, atol=0)
    assert [s[0] for s in seen] == calls
    assert sum((s[1] for s in seen), []) == t.tolist() and sum((s[2] for s in seen), []) == y.tolist()
    assert in_chunks(model, plan, None)(x, t, y).shape == x.shape and seen[-1][0] == n  # no width: one call


def test_held_out_figures_are_the_same_under_the_cap():
    """heldout_mse and bits_per_dim draw their noise a batch at a time and call the model in the
    plan's chunks: the figures equal the uncapped ones (to fp32 rounding), with the model called
    on chunks no larger than the cap."""
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,))
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    d, images = GaussianDiffusion("linear", 40), torch.rand(11, 3, 8, 8) * 2 - 1
    capped = ExecutionPlan(eval_elements=32 * 8 * 8 * 4)  # 4 images a call
    for fn, kw in ((heldout_mse, {"draws": 2}), (bits_per_dim, {"t_samples": 5})):
        calls.clear()
        want = fn(model, d, images, 6, plan=ExecutionPlan(), **kw)
        assert max(calls) == 6
        calls.clear()
        got = fn(model, d, images, 6, plan=capped, **kw)
        assert max(calls) == 4 and 2 in calls  # 6 = 4 + 2; the last batch, 5 = 4 + 1
        if fn is heldout_mse:
            assert got == pytest.approx(want, rel=1e-5)
        else:
            assert {k: got[k] for k in ("total", "decoder", "kl")} == pytest.approx(
                {k: want[k] for k in ("total", "decoder", "kl")}, rel=1e-5)
