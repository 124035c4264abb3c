"""python -m benchmarks.eval_chunk: whether a model's inference calls are faster on this CPU when a
large batch is taken in chunks (ExecutionPlan.eval_elements, plan.EVAL_ELEMENTS), and how large.

Two parts, each in turns within every round, so a drift of the machine's speed falls on every
candidate alike:
  forward  the model's eval-mode forward of one batch of --n images (random inputs and weights), in
           chunks of each --chunks size (the batch itself among them), per preset: ms an image, the
           median over --rounds rounds with min and max, the largest difference from the whole
           batch's output, and the chunk the rule gives at --elements.
  sampler  --sample-n images of the default sampler (DPM-Solver++(2M) SDE, Karras, 20 evaluations,
           fp32) on the --sample-preset's random weights: FastSampler with its inference capped at
           --elements against the same sampler with no cap (one call an evaluation), and diffusers'
           DDPMPipeline with DPMSolverMultistepScheduler (sde-dpmsolver++, Karras), the same solver
           (the peer as benchmarks.cpu_speed runs it); img/s, and the largest difference between the
           two FastSampler rows' images (the same noise: only the model's rounding can differ).

    python -m benchmarks.eval_chunk                      # tiny 256, cifar32 64, anime64 32; sampler: tiny 256
    python -m benchmarks.eval_chunk --presets tiny=256 --chunks 256,64,16 --sampler-rows ""

JSON to $OUT/eval_chunk.json when OUT is set, else benchmarks/results/; a table on stdout."""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ddpm_fast import FastSampler, GaussianDiffusion, UNet
from ddpm_fast.argtypes import positive_int
from ddpm_fast.chunking import model_width
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast.presets import PRESETS
from ddpm_fast.schedulers import DEFAULT_STEPS

from .common import bench_env, spread, write_result
from .diffusers_loop import pipeline_sampler
from .report_parts import md_table

SAMPLER_ROWS = ("capped", "whole", "diffusers")


def preset_n(text: str) -> tuple[str, int]:
    """PRESET=N -> (PRESET, N)."""
    name, _, n = text.partition("=")
    if name not in PRESETS or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected PRESET=N with PRESET one of {', '.join(PRESETS)}, got {text!r}")
    return name, int(n)


def forward_part(preset: str, n: int, chunks: list[int], rounds: int, elements: int) -> dict:
    """ms an image of one batch of n in chunks of each size, in turns within each round."""
    torch.manual_seed(0)
    model = UNet.from_preset(preset).eval()
    s = model.config["image_size"]
    x, t = torch.randn(n, model.config["in_ch"], s, s), torch.randint(0, 1000, (n,))
    sizes = sorted({min(c, n) for c in chunks} | {n}, reverse=True)

    def run(c: int) -> torch.Tensor:
        return torch.cat([model(a, b) for a, b in zip(x.split(c), t.split(c))])

    times: dict[int, list[float]] = {c: [] for c in sizes}
    with torch.inference_mode():
        whole = run(n)
        diff = {c: (run(c) - whole).abs().max().item() for c in sizes}  # also each size's warm-up
        for _ in range(rounds):
            for c in sizes:
                t0 = time.perf_counter()
                run(c)
                times[c].append((time.perf_counter() - t0) * 1000 / n)
    rule = ExecutionPlan(eval_elements=elements).images_per_call(model_width(model), s)
    return {"preset": preset, "n": n, "width": model_width(model), "rule_chunk": rule,
            "rows": [{"chunk": c, "ms_per_image": spread(times[c], 3), "max_abs_diff": diff[c]} for c in sizes]}


def sampler_part(preset: str, n: int, rows: list[str], rounds: int, elements: int) -> dict:
    """img/s of the default sampler, capped and whole, and of diffusers' pipeline, in turns."""
    torch.manual_seed(0)
    model = UNet.from_preset(preset).eval()
    s = model.config["image_size"]
    diffusion = GaussianDiffusion("linear", 1000)
    plan = ExecutionPlan(eval_elements=elements)
    calls = {"capped": FastSampler(model, diffusion, plan=plan),
             "whole": FastSampler(model, diffusion, plan=dataclasses.replace(plan, eval_elements=None))}
    go = {name: (lambda sampler=sampler: sampler.sample(n, s, generator=torch.Generator().manual_seed(0)))
          for name, sampler in calls.items()}
    go["diffusers"] = pipeline_sampler(model, diffusion, n)
    times: dict[str, list[float]] = {r: [] for r in rows}
    images = {}
    with torch.inference_mode():
        for r in rows:  # warm-up
            images[r] = go[r]()
        for _ in range(rounds):
            for r in rows:
                t0 = time.perf_counter()
                go[r]()
                times[r].append(time.perf_counter() - t0)
    diff = ((images["capped"] - images["whole"]).abs().max().item() if {"capped", "whole"} <= set(rows) else None)
    out = {"preset": preset, "n": n, "evaluations": DEFAULT_STEPS,
           "per_call": plan.images_per_call(model_width(model), s), "max_abs_diff": diff, "rows": []}
    for r in rows:
        out["rows"].append({"row": r, "s": spread(times[r], 3), "img_per_s": spread([n / v for v in times[r]], 3)})
    base = {r["row"]: r["img_per_s"]["median"] for r in out["rows"]}
    for r in out["rows"]:
        for ref in ("whole", "diffusers"):
            r[f"vs_{ref}"] = round(r["img_per_s"]["median"] / base[ref], 2) if ref in base else None
    return out


def report(result: dict) -> str:
    env = result["env"]
    head = (f"`python -m benchmarks.eval_chunk` on {env.get('cpu', env['device'])} ({env['threads']} threads), "
            f"torch {env['torch']}, fp32, --elements {env['elements']}: median (min-max) over the rounds.")
    parts = [head]
    for f in result["forward"]:
        parts.append(f"Forward, {f['preset']} (top level {f['width']} wide), {f['n']} images; the rule's chunk: "
                     f"{f['rule_chunk']}\n\n" + md_table(
                         ["chunk", "ms an image", "x whole batch", "max |diff|"],
                         [[r["chunk"], f"{r['ms_per_image']['median']:g} ({r['ms_per_image']['min']:g}-"
                           f"{r['ms_per_image']['max']:g})",
                           f"{f['rows'][0]['ms_per_image']['median'] / r['ms_per_image']['median']:.2f}x",
                           f"{r['max_abs_diff']:.1e}"] for r in f["rows"]]))
    if result.get("sampler"):
        p = result["sampler"]
        parts.append(f"Sampler, {p['preset']}, {p['n']} images, {p['evaluations']} evaluations (capped: "
                     f"{p['per_call']} images a call; the largest difference from whole's images: "
                     f"{p['max_abs_diff']})\n\n" + md_table(
                         ["row", "img/s", "x whole", "x diffusers"],
                         [[r["row"], f"{r['img_per_s']['median']:g} ({r['img_per_s']['min']:g}-"
                           f"{r['img_per_s']['max']:g})", r["vs_whole"], r["vs_diffusers"]] for r in p["rows"]]))
    return "\n\n".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_chunk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=lambda v: [preset_n(x) for x in v.split(",") if x],
                   default=[("tiny", 256), ("cifar32", 64), ("anime64", 32)],
                   help="PRESET=N,... of the forward part (default: tiny=256,cifar32=64,anime64=32)")
    p.add_argument("--chunks", type=lambda v: [positive_int(x) for x in v.split(",")],
                   default=[256, 128, 64, 32, 16, 8, 4, 2], help="chunk sizes (those above a preset's N are N)")
    p.add_argument("--elements", type=positive_int, default=1 << 20,
                   help="the cap under test: elements of the top-level activation a call (default 1 Mi)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--sample-preset", type=preset_n, default=("tiny", 256), help="PRESET=N of the sampler part")
    p.add_argument("--sampler-rows", default=",".join(SAMPLER_ROWS), help="empty: no sampler part")
    args = p.parse_args(argv)
    args.sampler_rows = [r for r in args.sampler_rows.split(",") if r]
    bad = [r for r in args.sampler_rows if r not in SAMPLER_ROWS]
    if bad:
        p.error(f"--sampler-rows: unknown row(s) {', '.join(bad)} (of {', '.join(SAMPLER_ROWS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = bench_env(threads=torch.get_num_threads(), elements=args.elements, rounds=args.rounds)
    result: dict = {"env": env, "forward": [], "sampler": None}
    for preset, n in args.presets:
        result["forward"].append(forward_part(preset, n, args.chunks, args.rounds, args.elements))
        write_result("eval_chunk", result)  # after each part: a cut-off run keeps the rest
    if args.sampler_rows:
        result["sampler"] = sampler_part(*args.sample_preset, args.sampler_rows, args.rounds, args.elements)
        write_result("eval_chunk", result)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
