import pytest
import torch

from ddpm_fast.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint


def test_the_format_version_is_written_and_checked(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"a": 1}}, path)
    assert torch.load(path, weights_only=True)["format"] == FORMAT_VERSION
    assert load_checkpoint(tmp_path)["format"] == FORMAT_VERSION

    newer = tmp_path / "newer.pt"
    torch.save({"model": {}, "config": {}, "format": FORMAT_VERSION + 1}, newer)
    with pytest.raises(ValueError, match=rf"{newer}.* format {FORMAT_VERSION + 1}.*upgrade ddpm-fast"):
        load_checkpoint(newer)


def test_a_checkpoint_from_before_the_version_field_loads_as_format_1(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": {"a": 1}, "step": 3}, old)
    ck = load_checkpoint(old)
    assert ck["step"] == 3 and torch.equal(ck["model"]["w"], torch.ones(2)) and "format" not in ck
