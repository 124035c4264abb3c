"""The execution plan: how a run computes, decided once from the device and the flags, then handed
to the model, the train step, the sampler and evaluation, none of which decides again.

    plan = ExecutionPlan.resolve(device="auto", fast=True, kernels="triton")
    plan.device, plan.autocast_dtype, plan.channels_last, plan.backends, plan.compile, plan.cuda_graphs

`fast` is the fast path: bf16 autocast (fp32 master weights), channels_last, torch.compile and,
on a GPU, CUDA graphs. On the CPU channels_last goes with the extension's GroupNorm only
(channels_last_pays). On a kind of CPU where it measured faster, the commands keep the memory a
step frees in the process's heap for the next (keep_heap). On every CPU an inference call of the
model takes a large batch in chunks (eval_elements): for memory, and in smaller ones on such a kind
where the heap is not kept (the Python API, a user's own malloc setting), on either path.
`kernels` is the backend of the fused ops; a backend that lacks an op for this plan falls back to
the reference for that op here, in one place (the extension has no attention; Triton's attention is
fp16/bf16-only on a GPU)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from .heap import can_keep_freed_memory, keep_freed_memory
from .ops.auto import device_class, extension_built, implementing, measured, picked_anywhere
from .ops.cpu_class import native_bf16

OPS = ("group_norm_act", "attention", "sampling_update", "dropout")
KERNELS = ("auto", "torch", "triton", "cpp", "aten")  # the --kernels choices of every command
# --compile MODE, the same flag in every command: a torch.compile mode for the fast path, or none.
COMPILE_HELP = ("torch.compile mode of the fast path (default, max-autotune-no-cudagraphs, ...), none, or auto "
                "(default on a GPU; none on the CPU, where a first compile outlasts what a short run saves)")
FAST_HELP = ("the fast path: bf16 autocast (fp32 master weights), channels_last (on the CPU with the C++ "
             "extension's GroupNorm), on a GPU also CUDA graphs "
             "(default: on on the kinds of CPU where it measured faster and learned the same, an Intel with AMX "
             "and an AMD with AVX-512 BF16; off on the others (an Intel with AVX-512 BF16 and no AMX, where "
             "bf16 measured slower; a CPU that emulates bf16; a kind not measured) and on a GPU until measured)")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A concrete device from a flag: "auto" is CUDA when present, else the CPU; None is the CPU;
    "cuda" gets the current index, so tensors' devices compare equal to it ("cuda" != "cuda:0")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name if name is not None else "cpu")
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def op_backends(kernels: str, device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, str]:
    """The backend of each fused op for `--kernels kernels` on this device."""
    if kernels not in KERNELS:
        raise ValueError(f"--kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "triton" and device.type != "cuda":
        # The interpreter runs Triton on a CPU for the tests, far too slowly to train or sample with.
        raise ValueError("--kernels triton needs a CUDA GPU (on a CPU use --kernels cpp, torch or auto)")
    backends = {op: implementing(op, kernels) for op in OPS}
    if kernels == "triton" and autocast_dtype is None:
        backends["attention"] = "torch"  # fp32 flash attention spills on a GPU: not shipped
    return backends


# The kinds of CPU (cpu_class) where the fast path measured faster than the reference and learned the
# same (held-out loss and KID within the seed-to-seed spread): the Intel Xeon with AMX, 2.4x the
# reference's img/s training tiny and 3.2x cifar32; the AMD EPYC with AVX-512 BF16, 2.1x and 1.9x.
# Not the Intel Xeon with AVX-512 BF16 and no AMX, where oneDNN's bf16 convolutions ran slower than
# its fp32 ones (bf16 autocast alone 0.68-0.78x the reference's img/s) and the whole fast path, with
# its kernel table, trained tiny at 0.78x the reference's img/s, cifar32 at 0.67x, and sampled at
# 0.85x, the heap kept on both; nor a CPU that emulates bf16 (AVX2 alone), where a step took 14x
# the reference's; nor a kind not measured, whose bf16 instructions alone do not say (all:
# benchmarks/RESULTS.md, "A CPU whose bf16 loses").
FAST_KINDS = {"cpu-intel-amx_bf16", "cpu-amd-avx512_bf16"}


def fast_by_default(device: torch.device) -> bool:
    """Whether a run that says neither --fast nor --no-fast takes the fast path: on a kind of CPU in
    FAST_KINDS; not yet on a GPU, where its learning has not been measured."""
    return device.type == "cpu" and device_class(device) in FAST_KINDS


# On each kind of CPU where it was measured (cpu_class), the most elements the model's widest activation
# (its top level: width x size^2 an image) may hold in one inference call on malloc's default heap; a
# larger batch is evaluated in chunks of that many images (ExecutionPlan.images_per_call). There a large
# batch ran slower an image: on the 2-core AVX2 EPYC, 256 tiny images took 1.73x the time an image of
# chunks of 32, 256 cifar32 ones 1.54x that of chunks of 8, and 32 anime64 ones 1.2-1.3x that of chunks
# of 2-16, with the same outputs (fp32). 1 Mi elements (4 MiB in fp32) gives tiny 32, cifar32 8,
# anime64 4, each at or within the rounds' spread of its best measured size (benchmarks.eval_chunk;
# benchmarks/RESULTS.md, "Inference in chunks"). The cause was malloc's, not the cache's: with the heap
# kept (KEEP_HEAP) the whole batch ran as fast as any chunk and faster than the rule's (tiny 256: 4.19
# ms an image against 4.49 in chunks of 32; cifar32 64: 78.0 against 85.2 in chunks of 8; anime64 32:
# 120.1 against 126.8 in chunks of 4; RESULTS, "The heap"), so a plan that keeps the heap takes the
# whole batch up to memory's cap below. A kind not measured takes memory's cap alone.
EVAL_ELEMENTS = {"cpu-amd-avx2": 1 << 20}

# On every CPU, the same measure capped for memory's sake. An image's share of an inference call's
# peak measured 14-26 times its widest activation in fp32 (benchmarks.eval_memory), so the sample
# command's whole batch of 256 would peak at about 4.9 GiB on anime64, 9 on dogs64 and 59 on
# butterflies256, past many machines' memory. 8 Mi elements (32 MiB in fp32) held every preset's
# peak to 0.5-1.1 GiB: tiny takes 256 images a call, cifar32 64, anime64 32, dogs64 16,
# butterflies128 8, butterflies256 2 (benchmarks/RESULTS.md, "A cap for memory"). A GPU evaluates
# the whole batch (its memory not measured by this project).
MEMORY_ELEMENTS = 1 << 23


def eval_elements_of(device: torch.device, heap_kept: bool = False) -> int | None:
    """On a CPU, MEMORY_ELEMENTS, or EVAL_ELEMENTS of its kind where that is smaller and the heap is
    not kept; None (the whole batch) on a GPU."""
    if device.type != "cpu":
        return None
    speed = None if heap_kept else EVAL_ELEMENTS.get(device_class(device))
    return min(speed or MEMORY_ELEMENTS, MEMORY_ELEMENTS)


# The kinds of CPU where a training step measured faster with glibc's malloc keeping freed memory in
# its heap (heap.keep_freed_memory) than with its default, which maps each large block afresh and
# faults its pages in again every step. On the 2-core AVX2 EPYC (benchmarks.heap, paired runs):
# tiny at 64 px, batch 32, 0.76x the step's time (0.70-0.93), its page faults 56x fewer; the first
# command's tiny at 32 px, batch 16, 0.91x (0.81-1.02); anime64 at batch 16 0.96x (0.91-1.04);
# cifar32 at batch 32 1.00x (0.95-1.09): no shape slower, the peak RSS at most 10% higher. On the
# 2-core Intel Xeon with AVX-512 BF16 and no AMX, the reference (its default path): tiny at 64 px
# 0.80x (0.79-0.85), cifar32 0.82x (0.62-0.90), anime64 0.74x (0.70-0.77), the first command's step
# 0.99x (0.70-1.23); the fast path 0.98x on cifar32 and 1.01x (0.99-1.04) on the first command's
# step, within the pairs' spread (benchmarks/RESULTS.md, "The heap", and "A CPU whose bf16 loses").
# A kind not measured keeps malloc's default, and so does a user who configures malloc themselves.
KEEP_HEAP = {"cpu-amd-avx2", "cpu-intel-avx512_bf16"}


def keep_heap_of(device: torch.device) -> bool:
    """Whether the commands of a run on `device` call heap.keep_freed_memory: on a kind of CPU in
    KEEP_HEAP, where glibc's malloc is the user's unconfigured allocator."""
    return device.type == "cpu" and device_class(device) in KEEP_HEAP and can_keep_freed_memory()


def compile_by_default(device: torch.device) -> str | None:
    """The torch.compile mode of a fast run that does not name one: on a GPU the default mode; on
    the CPU none, since a first compile (a minute or more) outlasts what it saves in a short run:
    compiled training is 1.03-1.06x the eager default on tiny and 1.02-1.10x on cifar32, sampling
    0.99-1.02x, over the last two runs (benchmarks/RESULTS.md, "CPU speed against the diffusers loop")."""
    return "default" if device.type == "cuda" else None


def channels_last_pays(device: torch.device, group_norm: str = "auto") -> bool:
    """Whether the fast path lays activations out channels_last on this device, with `group_norm`
    the GroupNorm's --kernels choice. On a GPU, always (tensor cores want NHWC). On the CPU, where
    oneDNN's bf16 convolutions want NHWC too, only with the extension's GroupNorm: `cpp`, or `auto`
    where this kind of CPU's table (measured in this layout) picks it. ATen's bf16 channels_last
    GroupNorm (`aten`) is several times slower than its NCHW one and eats the convolutions' gain;
    with the reference GroupNorm (`torch`, and `auto` on a CPU never measured) the layout measured a
    small gain on one CPU and a loss on another, so those stay NCHW (benchmarks/RESULTS.md, "CPU
    speed against the diffusers loop")."""
    if device.type == "cuda":
        return True
    return extension_built() and (group_norm == "cpp" or
                                  group_norm == "auto" and picked_anywhere("group_norm_act", "cpp", device))


@dataclass(frozen=True)
class ExecutionPlan:
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None   # None: fp32 (TF32 matmuls on a GPU)
    channels_last: bool = False
    backends: dict = field(default_factory=lambda: dict.fromkeys(OPS, "auto"))
    compile: str | None = None                  # torch.compile mode, None: eager
    cuda_graphs: bool = False
    eval_elements: int | None = None            # per inference call, of the widest activation; None: no cap
    keep_heap: bool = False                     # the commands keep freed memory in the heap (keep_heap_of)

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", *, fast: bool | None = False, kernels: str = "auto",
                compile: str | None = "auto", cuda_graphs: bool | None = None,
                keep_heap: bool | None = None) -> "ExecutionPlan":
        """The plan of a run from its flags. `fast=None` is fast_by_default(device); `compile`
        counts only on the fast path ("none" or None: eager; "auto": compile_by_default(device));
        `cuda_graphs` defaults to fast-on-a-GPU; `keep_heap=None` is keep_heap_of(device)."""
        dev = resolve_device(device)
        keep_heap = keep_heap_of(dev) if keep_heap is None else keep_heap
        fast = fast_by_default(dev) if fast is None else fast
        compile = compile_by_default(dev) if compile == "auto" else compile
        dtype = torch.bfloat16 if fast else None
        graphs = fast and dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        if graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        mode = compile if fast and compile not in (None, "none") else None
        backends = op_backends(kernels, dev, dtype)
        return cls(device=dev, autocast_dtype=dtype,
                   channels_last=fast and channels_last_pays(dev, backends["group_norm_act"]),
                   backends=backends, compile=mode, cuda_graphs=graphs,
                   eval_elements=eval_elements_of(dev, keep_heap), keep_heap=keep_heap)

    @classmethod
    def from_options(cls, device: torch.device, *, dtype: torch.dtype | None = None, compile: bool = False,
                     cuda_graphs: bool = False, backend: str = "auto") -> "ExecutionPlan":
        """The plan of a caller that gives its options one by one (FastSampler without a plan). dtype
        None is the library's default on the device, the fast path's bf16 autocast where that is the
        default (fast_by_default: the kinds of CPU where it measured faster), else fp32; torch.float32 is fp32, no
        autocast. channels_last goes with a reduced-precision autocast, as on the fast path (the model
        need not be converted: its convolutions follow the input's layout)."""
        if dtype is None:
            dtype = torch.bfloat16 if fast_by_default(device) else None
        dtype = None if dtype == torch.float32 else dtype
        return cls(device=device, autocast_dtype=dtype,
                   channels_last=dtype is not None and channels_last_pays(device, backend),
                   backends=dict.fromkeys(OPS, backend), compile="default" if compile else None,
                   cuda_graphs=cuda_graphs, eval_elements=eval_elements_of(device))

    def apply_to_process(self) -> None:
        """What this plan asks of the process that runs it, done by the command that owns the process
        (train, sample, evaluate; not the Python API): freed memory kept in the heap where keep_heap."""
        if self.keep_heap:
            keep_freed_memory()

    def with_graphs(self, on: bool) -> "ExecutionPlan":
        """This plan with CUDA graphs on or off (the training grids draw from a seeded generator)."""
        return replace(self, cuda_graphs=on and self.device.type == "cuda")

    def images_per_call(self, width: int | None, image_size: int) -> int | None:
        """The most images one inference call of a model whose top level is `width` channels wide
        should take (eval_elements), at least 1; None: any batch at once (no cap here, or the width
        unknown)."""
        if self.eval_elements is None or width is None:
            return None
        return max(1, self.eval_elements // (width * image_size ** 2))

    @property
    def fast(self) -> bool:
        return self.autocast_dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this plan's device and memory format, its fused ops on this plan's backends."""
        model = model.to(self.device, memory_format=self.memory_format)
        if hasattr(model, "set_backend"):
            model.set_backend(self.backends)
        return model

    def describe(self) -> str:
        """One line: the path, layout, compile, graphs and each op's backend; where one is `auto`, the
        device class whose measurements it reads, or that there are none (the reference runs)."""
        kernels = ", ".join(f"{op} {b}" for op, b in self.backends.items())
        if "auto" in self.backends.values():
            cls = device_class(self.device)
            kernels += (f" (auto: {cls}'s measurements)" if measured(self.device) else
                        f" (auto: {cls} not measured, the reference kernels)")
        emulated = self.fast and self.device.type == "cpu" and not native_bf16()
        chunks = (f", inference in chunks of {self.eval_elements / 2 ** 20:g} Mi activations" if self.eval_elements
                  else "")
        heap = ", freed memory kept in the heap" if self.keep_heap else ""
        return (f"{self.device}, {'bf16 autocast' if self.fast else 'fp32'}"
                f"{' (emulated: this CPU has no bf16 instructions, --no-fast is faster)' if emulated else ''}"
                f"{', channels_last' if self.channels_last else ''}, compile {self.compile or 'off'}, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}"
                f"{chunks}{heap}; kernels: {kernels}")
