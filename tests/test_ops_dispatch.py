"""Backend dispatch: explicit choices, the environment override, and that dispatch leaves no
graph break in a compiled model."""
import importlib.util

import pytest
import torch
import torch._dynamo

from ddpm_fast import UNet, ops
from ddpm_fast.ops import auto, reference


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(auto, "_CHOICES", {})


def test_auto_is_reference_without_a_measurement():
    x = torch.randn(2, 64, 8, 8)
    assert auto.resolve("group_norm_act", "auto", x) == "torch"
    assert auto.resolve("attention", "torch", x) == "torch"
    with pytest.raises(ValueError, match="backend"):
        ops.group_norm_silu(x, 32, None, None, backend="cuda-magic")


def test_environment_override(monkeypatch):
    x = torch.randn(2, 8, 4, 4)
    monkeypatch.setenv("DDPM_FAST_BACKEND_SAMPLING_UPDATE", "cpp")
    assert auto.resolve("sampling_update", "auto", x) == "cpp"
    assert auto.resolve("group_norm_act", "auto", x) == "torch"  # only that op
    assert auto.resolve("sampling_update", "torch", x) == "torch"  # an explicit choice wins


def test_a_call_s_pass_is_whether_autograd_will_differentiate_it(monkeypatch):
    x, w = torch.zeros(2, 8, 4, 4), torch.zeros(8, requires_grad=True)
    assert auto.direction_of(x) == "fwd" and auto.direction_of(x, None, w) == "fwd+bwd"
    with torch.no_grad():
        assert auto.direction_of(x, w) == "fwd"
    # auto reads the table for the call's pass: an entry won in training serves training calls only
    q = torch.randn(2, 1, 16, 8)
    entry = {"op": "attention", "device_class": auto.device_class(q.device), "dtype": "float32", "shape": "L16xd8",
             "backend": "aten", "speedup": 2.0, "directions": ["fwd+bwd"]}
    monkeypatch.setattr(auto, "load_table", lambda: {"entries": [entry]})
    seen = []
    monkeypatch.setattr(ops, "_backend_module", lambda name: seen.append(name) or reference)
    with torch.no_grad():
        ops.attention(q, q, q)
    ops.attention(q, q, q.requires_grad_())
    assert seen == ["torch", "aten"]


def test_unet_compiles_without_graph_breaks():
    m = UNet.from_preset("tiny", image_size=16, ch_mult=(1, 2), attn_res=(8,))
    ex = torch._dynamo.explain(m)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert ex.graph_break_count == 0 and ex.graph_count == 1


@pytest.mark.parametrize("backend", ["auto", "aten", pytest.param("cpp", marks=pytest.mark.skipif(
    importlib.util.find_spec("ddpm_fast._C") is None, reason="the C++ extension is not built"))])
def test_every_cpu_backend_compiles_without_graph_breaks(backend):
    """Dispatch to a backend module must be traceable: importlib.import_module in it broke the graph
    at every GroupNorm of a compiled model on any backend but the reference. Under bf16 autocast at
    the tiny preset's size, auto's CPU table picks the `aten` GroupNorm too."""
    m = UNet.from_preset("tiny").set_backend(backend)
    with torch.autocast("cpu", torch.bfloat16):
        ex = torch._dynamo.explain(m)(torch.randn(2, 3, 32, 32), torch.tensor([1, 900]))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason)[:200] for r in ex.break_reasons]


def test_model_wide_cpp_backend_runs_attention_on_the_reference():
    """The extension has no attention: --kernels cpp runs the UNet's attention on the reference
    and still its GroupNorms on the extension."""
    from ddpm_fast.ops import cpp
    if not cpp.available():
        pytest.skip("ddpm_fast._C not built")
    q, k, v = (torch.randn(2, 1, 16, 8) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, backend="cpp"), ops.attention(q, k, v, backend="torch"))
    m = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        torch.testing.assert_close(m.set_backend("cpp")(x, t), m.set_backend("torch")(x, t), rtol=1e-4, atol=1e-4)


def test_ddpm_step_takes_a_device_step_tensor():
    from ddpm_fast import GaussianDiffusion
    d = GaussianDiffusion("linear", 50)
    x, eps, z = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    from conftest import NoHostSync
    for t in (0, 17, 49):
        with NoHostSync():  # a step tensor is read on the device: graph-safe
            a = ops.ddpm_step(x, eps, torch.full((3,), t), d, noise=z, backend="torch")
        torch.testing.assert_close(a, ops.ddpm_step(x, eps, t, d, noise=z, backend="torch"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sampling_update_passes_every_argument_to_the_backend(backend):
    """history, base, clip and noise reach the kernels as the reference takes them; with noise=None
    the seed comes from the generator (the same generator state, the same step)."""
    from ddpm_fast.ops import cpp
    if backend == "cpp" and not cpp.available():
        pytest.skip("ddpm_fast._C not built")
    if backend == "triton":
        pytest.importorskip("triton")
    x, mo, base, noise = (torch.randn(2, 3, 4, 5) for _ in range(4))
    history = (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    coef = ops.coef_row(1.2, 0.5, a=0.6, b=(0.3, -0.2, 0.1), sigma=0.4, r=-0.3)  # float64 on purpose: dispatch casts
    want = ops.sampling_update(x, mo, coef, True, history, base, noise, backend="torch")
    got = ops.sampling_update(x, mo, coef, True, history, base, noise, backend=backend)
    torch.testing.assert_close(got, want)

    def drawn(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.sampling_update(x, mo, coef, True, history, base, generator=torch.Generator().manual_seed(seed),
                                   backend=backend)
    torch.testing.assert_close(drawn(0), drawn(0), rtol=0, atol=0)
    assert not torch.equal(drawn(0)[0], drawn(1)[0])
    torch.testing.assert_close(drawn(0)[1], want[1])  # x0 takes no noise


def test_sampling_update_refuses_a_short_row():
    """A row of another width (an 8-weight row from before the r term) is refused, not misread."""
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="coef must hold the 9 weights"):
        ops.sampling_update(x, x, torch.zeros(8), noise=x, backend="torch")


def test_triton_attention_falls_back_outside_its_head_dims():
    """dogs64's middle block has d = 512, past the Triton kernels' 256: --kernels triton runs
    that attention on the reference instead of refusing the model."""
    pytest.importorskip("triton")
    q, k, v = (torch.randn(1, 1, 4, 512) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, backend="triton"), ops.attention(q, k, v, backend="torch"))
