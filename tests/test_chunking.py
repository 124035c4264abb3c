"""chunking: a model's inference calls in chunks of the plan's cap (plan.EVAL_ELEMENTS), the same
outputs as one call; the width the cap divides by, read from ours, diffusers' and wrapped models."""
import pytest
import torch

from ddpm_fast import UNet
from ddpm_fast.chunking import in_chunks, model_width
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

