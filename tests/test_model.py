import pytest
import torch

from ddpm_fast import PRESETS, UNet
from ddpm_fast.model import timestep_embedding


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_preset_parameter_counts():
    assert 25.3e6 <= n_params(UNet.from_preset("anime64")) <= 25.4e6  # the anime-face script's 25.4M
    assert n_params(UNet.from_preset("cifar32")) == pytest.approx(35.7e6, rel=2e-3)  # Ho et al.'s 35.7M
    assert n_params(UNet.from_preset("tiny")) < 2e6
    assert {"anime64", "cifar32", "dogs64", "butterflies128", "butterflies256", "tiny"} <= set(PRESETS)


@pytest.mark.parametrize("act", ["silu", "hardswish"])
def test_forward_shape_and_channels_last(act):
    m = UNet.from_preset("tiny", image_size=16, act=act).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999])
    y = m(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()
    m_cl = m.to(memory_format=torch.channels_last)
    y_cl = m_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
    assert m(x, t.float()).shape == x.shape  # float times (continuous schedule)


def test_overrides_and_errors():
    m = UNet.from_preset("tiny", ch=16, ch_mult=[1, 2], attn_res=[])
    assert m.config["ch"] == 16 and m.config["ch_mult"] == (1, 2)
    with pytest.raises(ValueError, match="unknown --preset"):
        UNet.from_preset("nope")
    with pytest.raises(ValueError, match="--image-size"):
        UNet.from_preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="unknown model field"):
        UNet.from_preset("tiny", widht=3)


def test_time_embedding_matters():
    m = UNet.from_preset("tiny", image_size=16).eval()
    x = torch.randn(1, 3, 16, 16)
    assert (m(x, torch.tensor([5])) - m(x, torch.tensor([900]))).abs().max() > 1e-4


def test_unet_takes_what_it_is_not_given_from_the_default_preset():
    from ddpm_fast.presets import DEFAULT_PRESET, PRESETS

    model = UNet(ch=8, num_groups=4)
    assert model.config == UNet.from_preset(DEFAULT_PRESET, ch=8, num_groups=4).config
    assert {k: model.config[k] for k in PRESETS[DEFAULT_PRESET] if k != "ch"} == {
        k: v for k, v in PRESETS[DEFAULT_PRESET].items() if k != "ch"}
    assert UNet(ch=8, num_groups=4, act="hardswish").config["act"] == "hardswish"


def test_norm_out_groups_sets_the_output_norm_alone():
    from torch import nn

    model = UNet.from_preset("tiny", image_size=16, norm_out_groups=8)
    groups = {name: m.num_groups for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    assert groups.pop("norm_out") == 8
    assert groups and set(groups.values()) == {32}
    # a config without the field (a checkpoint from before it) builds the output norm with num_groups
    config = dict(model.config)
    del config["norm_out_groups"]
    assert UNet(**config).norm_out.num_groups == 32
    assert UNet.from_preset("tiny", image_size=16).config["norm_out_groups"] == 32


@pytest.mark.parametrize("in_ch", [1, 3])
def test_mean_skip_adds_the_input_means_mixed_by_the_time_embedding(in_ch):
    """Zero-initialised, the model is the one without the path; once trained, the path adds to each
    output channel a constant over the image: M(t) mean(x) + b(t), M and b from the time embedding
    (written out here with einsum, apart from the module's baddbmm). Gradients reach its weights."""
    torch.manual_seed(0)
    plain = UNet.from_preset("tiny", image_size=16, ch_mult=(1, 2), in_ch=in_ch)
    model = UNet.from_preset("tiny", image_size=16, ch_mult=(1, 2), in_ch=in_ch, mean_skip=True)
    assert model.config["mean_skip"] and not plain.config["mean_skip"]
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["mean_skip.proj.bias", "mean_skip.proj.weight"]
    x, t = torch.randn(5, in_ch, 16, 24), torch.randint(0, 1000, (5,))
    torch.testing.assert_close(model(x, t), plain(x, t), rtol=0, atol=0)

    with torch.no_grad():
        model.mean_skip.proj.weight.normal_(0, 0.1), model.mean_skip.proj.bias.normal_(0, 0.1)
    out = model(x, t)
    temb = model.temb(timestep_embedding(t, model.ch, model.freq_shift))
    mix = torch.nn.functional.linear(torch.nn.functional.silu(temb), model.mean_skip.proj.weight,
                                     model.mean_skip.proj.bias).view(5, in_ch, in_ch + 1)
    added = torch.einsum("bij,bj->bi", mix[..., :in_ch], x.mean((2, 3))) + mix[..., in_ch]
    torch.testing.assert_close(out - plain(x, t), added[..., None, None].expand_as(out), rtol=1e-5, atol=1e-5)

    out.square().mean().backward()
    assert model.mean_skip.proj.weight.grad.abs().sum() > 0 and model.mean_skip.proj.bias.grad.abs().sum() > 0
    # a config from before the field builds without the path
    config = dict(model.config)
    del config["mean_skip"]
    assert UNet(**config).mean_skip is None
