"""python -m benchmarks.eval_memory: the peak memory of the model's inference calls on the CPU, per
preset: what the plan's cap on a call (plan.MEMORY_ELEMENTS) bounds.

Each run is a fresh process, for a clean peak RSS: the preset's model with random weights, freed
memory kept in the heap as the commands keep it, one eval-mode forward of N images in fp32 (the
widest dtype a CPU path computes in) under inference_mode, in chunks of at most C; its peak RSS less
the RSS before the forward (Linux: /proc/self/status after a malloc_trim and a reset of the peak).
Per preset, with P the images a call at --elements (ExecutionPlan.images_per_call):
  whole P/2 and whole P  the cost of an image (the slope between them), and its ratio to an image's
                         widest activation in fp32 (the top level, width x size^2 x 4 bytes: what
                         the cap counts);
  2P in chunks of P      the peak under the cap, for any batch: a chunk's peak, not the batch's.
A whole batch of --batch images (the sample command's --batch-size) is extrapolated, not run.

    python -m benchmarks.eval_memory                         # every preset at the plan's cap
    python -m benchmarks.eval_memory --presets tiny,anime64 --elements 4194304

JSON to $OUT/eval_memory.json when OUT is set, else benchmarks/results/; a table on stdout."""
from __future__ import annotations

import argparse
import ctypes
import json

from ddpm_fast.argtypes import positive_int
from ddpm_fast.presets import PRESETS

from .common import bench_env, child_json, write_result
from .report_parts import md_table


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        line = next(v for v in f if v.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def start_measuring() -> float:
    """Hand the free memory back and reset the peak RSS (Linux's clear_refs 5), so the next peak is
    the forward's; return the RSS now. Without the trim, memory freed while the model was built would
    be reused by the forward unseen, and the peak so far would hide a smaller forward's."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def one_run(preset: str, n: int, chunk: int) -> dict:
    """One forward of n images in chunks of `chunk`, in this process: its peak RSS over the RSS before."""
    import torch

    from ddpm_fast import UNet
    from ddpm_fast.heap import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    model = UNet.from_preset(preset).eval()
    s = model.config["image_size"]
    x, t = torch.randn(n, model.config["in_ch"], s, s), torch.randint(0, 1000, (n,))
    before = start_measuring()
    with torch.inference_mode():
        out = torch.cat([model(a, b) for a, b in zip(x.split(chunk), t.split(chunk))])
    assert out.shape == x.shape
    return {"preset": preset, "n": n, "chunk": chunk, "peak_over_start_mib": round(status_mib("VmHWM") - before, 1)}


def preset_part(preset: str, elements: int, batch: int) -> dict:
    """The three runs of a preset, and what they say of an image and of the cap."""
    from ddpm_fast import UNet
    from ddpm_fast.chunking import model_width
    from ddpm_fast.plan import ExecutionPlan

    model = UNet.from_preset(preset)
    width, s = model_width(model), model.config["image_size"]
    per_call = ExecutionPlan(eval_elements=elements).images_per_call(width, s)
    # The slope takes two batch sizes: half the cap and the cap, or at a cap of one image 1 and 2.
    sizes = (per_call // 2, per_call) if per_call > 1 else (1, 2)

    def run(n: int, chunk: int) -> float:
        argv = ["--one", preset, str(n), str(chunk)]
        return child_json("benchmarks.eval_memory", argv, f"{preset}, {n} images in chunks of {chunk}")[
            "peak_over_start_mib"]

    whole = {n: run(n, n) for n in sizes}
    capped = run(2 * per_call, per_call)
    slope = (whole[sizes[1]] - whole[sizes[0]]) / (sizes[1] - sizes[0])
    widest_mib = width * s * s * 4 / 2 ** 20
    return {"preset": preset, "image_size": s, "width": width, "per_call": per_call,
            "widest_mib_per_image": round(widest_mib, 3),
            "peak_mib": {**{f"whole_{n}": peak for n, peak in whole.items()},
                         f"{2 * per_call}_in_chunks_of_{per_call}": capped},
            "mib_per_image": round(slope, 2), "x_widest": round(slope / widest_mib, 1),
            "capped_peak_mib": capped,
            f"whole_{batch}_estimate_mib": round(whole[per_call] + slope * (batch - per_call))}


def report(result: dict) -> str:
    env = result["env"]
    batch = env["batch"]
    head = (f"`python -m benchmarks.eval_memory` on {env.get('cpu', env['device'])}, torch {env['torch']}, fp32, "
            f"the heap kept, --elements {env['elements']}: the peak RSS of one forward over the RSS before it.")
    rows = [[p["preset"], f"{p['widest_mib_per_image']:g}", f"{p['mib_per_image']:g}", f"{p['x_widest']:g}",
             p["per_call"], f"{p['capped_peak_mib']:g}", f"{p[f'whole_{batch}_estimate_mib'] / 1024:.1f}"]
            for p in result["presets"]]
    return head + "\n\n" + md_table(
        ["preset", "widest activation, MiB an image", "MiB an image", "x widest", "images a call at the cap",
         "peak MiB under the cap", f"{batch} whole, GiB (extrapolated)"], rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    from ddpm_fast.plan import MEMORY_ELEMENTS

    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=lambda v: [x for x in v.split(",") if x], default=list(PRESETS),
                   help="comma-separated (default: all)")
    p.add_argument("--elements", type=positive_int, default=MEMORY_ELEMENTS,
                   help=f"the cap: elements of the top-level activation a call (default plan.MEMORY_ELEMENTS, "
                        f"{MEMORY_ELEMENTS})")
    p.add_argument("--batch", type=positive_int, default=256,
                   help="the whole batch to extrapolate to (default 256, the sample command's --batch-size)")
    p.add_argument("--one", nargs=3, metavar=("PRESET", "N", "CHUNK"), help=argparse.SUPPRESS)  # a child's run
    args = p.parse_args(argv)
    bad = [x for x in args.presets if x not in PRESETS]
    if bad:
        p.error(f"--presets: unknown preset(s) {', '.join(bad)} (of {', '.join(PRESETS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        preset, n, chunk = args.one
        print(json.dumps(one_run(preset, int(n), int(chunk))))
        return 0
    result = {"env": bench_env(elements=args.elements, batch=args.batch), "presets": []}
    for preset in args.presets:
        result["presets"].append(preset_part(preset, args.elements, args.batch))
        print(json.dumps(result["presets"][-1]), flush=True)
        write_result("eval_memory", result)  # after each preset: a cut-off run keeps the rest
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
