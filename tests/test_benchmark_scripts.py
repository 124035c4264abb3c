"""The epoch, sampling, profile and fidelity benchmarks run end to end on CPU at toy scale and write the
JSON the GPU suite collects (their real figures need a GPU)."""
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import epoch, fidelity, profile_step, sample


def test_epoch_benchmark(tmp_path, monkeypatch):
    data = tmp_path / "jpegs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert epoch.main(["--data", str(data), "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
                       "--steps", "2", "--warmup", "1", "--workers", "0", "--compile", "none",
                       "--epoch-images", "1000"]) == 0
    r = json.loads((tmp_path / "out" / "epoch.json").read_text())
    ref, fast = r["epoch"]
    assert (ref["path"], ref["loader"], fast["path"]) == ("reference", "torch", "fast")
    for x in (ref, fast):
        # 2 timed steps of 4 images, extrapolated to 1000 images (img/s is rounded for display)
        assert x["img_per_s"] > 0 and x["epoch_s"] == pytest.approx(1000 * x["timed_s"] / 8, rel=0.01)
        assert x["speedup_vs_3090_epoch"] > 0
    assert ref["speedup_vs_reference"] == 1.0


def test_sample_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert sample.main(["--preset", "tiny", "--image-size", "8", "--n", "2", "--timesteps", "20",
                        "--ddpm-steps", "4", "--ddim-steps", "3"]) == 0
    rows = json.loads((tmp_path / "sample.json").read_text())["sample"]
    assert {(r["path"], r["method"]) for r in rows} == {(p, m) for p in ("reference", "fast") for m in ("ddpm", "ddim")}
    ddpm = next(r for r in rows if r["method"] == "ddpm")
    assert ddpm["steps_run"] == 4 and ddpm["steps"] == 20  # extrapolated from 4 of 20 steps


def test_fidelity_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert fidelity.main(["--steps", "6", "--batch-size", "4", "--image-size", "8", "--test-images", "8",
                          "--mse-draws", "1", "--timesteps", "50"]) == 0
    r = json.loads((tmp_path / "fidelity.json").read_text())
    assert [x["path"] for x in r["runs"]] == ["reference", "fast", "reference"]
    assert len(r["losses"]["fast_seed0"]) == 6
    fv = r["report"]["fast_vs_reference"]
    assert 0 <= fv["final_loss_rel"] < 0.05  # same seed, same data: bf16 only perturbs


def test_profile_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert profile_step.main(["--preset", "tiny", "--image-size", "8", "--batch-size", "2", "--sample-n", "2",
                              "--compile", "none", "--warmup", "1", "--steps", "2", "--top", "5"]) == 0
    rows = json.loads((tmp_path / "profile.json").read_text())["profile"]
    assert [(r["workload"], r["path"]) for r in rows] == [
        ("train", "reference"), ("train", "fast"), ("sample", "reference"), ("sample", "fast")]
    for r in rows:
        shares = [k["share"] for k in r["top"]]
        assert len(shares) == 5 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.001
        assert sum(r["categories"].values()) == pytest.approx(1, abs=2e-3)
        assert r["categories"]["matmul/conv"] > 0.1  # a UNet step is mostly convolutions, even on CPU
        assert 0 < r["kernel_ms_per_step"] and 0 < r["busy"] <= 1.5
    train_ops = {k["name"] for k in rows[0]["top"]}
    assert any("convolution" in n for n in train_ops)


@pytest.mark.parametrize("name, cat", [
    ("triton_red_fused_native_group_norm_silu_0", "normalisation"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "matmul/conv"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer/EMA"),
    ("triton_poi_fused_add_mul_silu_3", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("aten::mkldnn_convolution", "matmul/conv"),
    ("some_unknown_kernel", "other"),
])
def test_profile_categories(name, cat):
    assert profile_step.category(name) == cat
