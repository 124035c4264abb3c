"""Dropout: the extension's CPU kernel (csrc/dropout.cpp) against an independent NumPy Philox4x32-10
and the mask rule written out here, element for element, forward and backward; ops.dropout's
dispatch against ATen's dropout (the reference); the UNet's dropout layers on either backend."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import UNet, ops
from ddpm_fast.ops import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="ddpm_fast._C not built: pip install --no-build-isolation -e .")

_LOW = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, counters: np.ndarray) -> np.ndarray:
    """(n, 4) uint32 words of Philox4x32-10 (Salmon et al. 2011) at counters (c, 0, 0, 0) under the
    64-bit key `seed`, from the paper's round function, in NumPy."""
    c0, c1 = counters & _LOW, counters >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed) & _LOW, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _LOW, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _LOW
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _LOW, (k1 + np.uint64(0xBB67AE85)) & _LOW
    return np.stack([c0, c1, c2, c3], 1)


def expected_mask(seed: int, n: int, p: float) -> np.ndarray:
    """The kernel's rule: element i = 64 c + 16 w + l (memory order) is kept when word w of the block
    at counter 16 c + l is below (1 - p) 2^32."""
    chunks = -(-n // 64)
    words = philox4x32_10(seed, np.arange(16 * chunks, dtype=np.uint64)).reshape(chunks, 16, 4)
    return (words.transpose(0, 2, 1).reshape(-1)[:n] < round((1 - p) * 2**32))


def logical(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Values listed in `like`'s memory order (NCHW or channels_last), as a tensor indexed like it."""
    if like.dim() == 4 and not like.is_contiguous():
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(like.shape)


CASES = [  # (shape, channels_last): sizes that are not multiples of the 64-element chunks
    ((3, 5, 7, 11), False), ((2, 13, 5, 3), True), ((1,), False), ((63,), False), ((65,), False), ((4, 64, 8, 8), True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, channels_last", CASES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_matches_philox_rule_forward_and_backward(poisoned, shape, channels_last, dtype, p):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = int(torch.randint(0, 2**62, (1,)))
    keep = logical(torch.from_numpy(expected_mask(seed, x.numel(), p)), x)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)  # the kernel multiplies by the float reciprocal
    x.requires_grad_()
    y, mask = torch.ops.ddpm_fast.dropout(x, p, torch.tensor([seed]))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt) and mask.is_contiguous(memory_format=fmt)
    assert torch.equal(mask, keep)
    assert torch.equal(y.detach(), torch.where(keep, x.detach().float() * scale, 0.0).to(dtype))  # bit for bit
    gy = torch.randn(shape).to(dtype)  # NCHW-contiguous even where x is channels_last
    y.backward(gy)
    want = torch.where(keep, gy.float() * scale, 0.0)
    torch.testing.assert_close(x.grad.float(), want, atol=0, rtol=0 if dtype == torch.float32 else 1e-2)


def test_keep_rate_and_seeds():
    x = torch.ones(1 << 20)
    for p in (0.1, 0.3):
        a = cpp.dropout(x, p, torch.tensor([1]))
        kept = (a != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
        assert torch.equal(a.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    assert torch.equal(cpp.dropout(x, 0.1, torch.tensor([1])), cpp.dropout(x, 0.1, torch.tensor([1])))
    assert not torch.equal(cpp.dropout(x, 0.1, torch.tensor([1])), cpp.dropout(x, 0.1, torch.tensor([2])))
    # neighbours are independent: a kept element's next one is kept at the same rate
    keep = cpp.dropout(x, 0.5, torch.tensor([3])) != 0
    both = (keep[:-1] & keep[1:]).double().mean().item()
    assert abs(both - 0.25) < 5 * (0.25 * 0.75 / x.numel()) ** 0.5


def test_edges_p_zero_and_one():
    x = torch.randn(5, 7, requires_grad=True)
    y, mask = torch.ops.ddpm_fast.dropout(x, 0.0, torch.tensor([4]))
    assert torch.equal(y, x.detach()) and mask.all()
    y, mask = torch.ops.ddpm_fast.dropout(x, 1.0, torch.tensor([4]))
    assert not y.any() and not mask.any()
    y.sum().backward()
    assert not x.grad.any()
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.ddpm_fast.dropout(x, 1.5, torch.tensor([4]))


def test_opcheck():
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.ddpm_fast.dropout.default, (x, 0.2, torch.tensor([5])))


def test_dispatch():
    x = torch.randn(4, 8, 6, 6)
    assert ops.dropout(x, 0.3, training=False, backend="cpp") is x
    assert ops.dropout(x, 0.0, backend="cpp") is x
    with pytest.raises(ValueError, match="dropout probability"):
        ops.dropout(x, -0.1)
    for backend in ("torch", "aten", "triton"):  # the reference: ATen's dropout on torch's generator
        torch.manual_seed(7)
        got = ops.dropout(x, 0.3, backend=backend)
        torch.manual_seed(7)
        assert torch.equal(got, F.dropout(x, 0.3, training=True)), backend
    # the extension: its seed drawn from the generator, so a seeded run repeats its masks
    torch.manual_seed(7)
    a = ops.dropout(x, 0.3, backend="cpp")
    torch.manual_seed(7)
    assert torch.equal(a, ops.dropout(x, 0.3, backend="cpp"))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(ops.dropout(x, 0.3, generator=g, backend="cpp"),
                       ops.dropout(x, 0.3, generator=torch.Generator().manual_seed(7), backend="cpp"))
    assert not torch.equal(a, ops.dropout(x, 0.3, backend="cpp"))  # the next draw, another mask


def test_unet_dropout_on_either_backend():
    model = UNet.from_preset("tiny", dropout=0.3)
    assert not any(k.endswith("dropout") for k in model.state_dict())  # checkpoints unchanged
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    model.eval()
    with torch.no_grad():
        want = model.set_backend("torch")(x, t)
        assert torch.equal(model.set_backend({"dropout": "cpp"})(x, t), want)  # eval: no dropout on either
    model.train().set_backend({"dropout": "cpp"})
    a = model(x, t)
    a.square().mean().backward()
    assert not torch.allclose(a, want) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
