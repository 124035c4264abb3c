"""Backend dispatch: explicit choices, the environment override, and that dispatch leaves no
graph break in a compiled model."""
import pytest
import torch
import torch._dynamo

from ddpm_fast import UNet, ops
from ddpm_fast.ops import auto


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


def test_unet_compiles_without_graph_breaks():
    m = UNet.from_preset("tiny", image_size=16, ch_mult=(1, 2), attn_res=(8,))
    ex = torch._dynamo.explain(m)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert ex.graph_break_count == 0 and ex.graph_count == 1
