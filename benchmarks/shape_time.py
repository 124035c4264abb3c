"""python -m benchmarks.shape_time: the time of a training step for several model shapes, in turn.

Each --shape is NAME=FLAGS: the `python -m ddpm_fast.train` flags of one config (read by the
trainer's own parser, so a shape is exactly what that command would train; no flags is the first
command's model), for example

    python -m benchmarks.shape_time --shape base= --shape "mult4=--ch-mult 1,2,2,2" \
        --shape "res2=--num-res-blocks 2" --shape "attn16=--attn-res 8,16"

Every shape's run is built by the trainer (build_run, on the plan its flags resolve to) and steps a
fixed random batch (data loading is not timed). The shapes take turns within each of --rounds
rounds: --warmup steps, then --steps timed ones, so a drift of the machine's speed falls on every
shape alike. A shape's ms/step is the median over the rounds (with their min and max), and its
ratio is set against the first shape's median. The steps of an equal-time comparison follow from
the ratio: a shape that steps 1.2 times as slowly trains 1 / 1.2 of the steps in the same time
(docs/ablation_time_*.toml). Each row also counts the shape's parameters and the GFLOP of its
step's products and convolutions (benchmarks.profile_step.step_gflop, on the meta device).
JSON to $OUT/shape_time.json when OUT is set, else benchmarks/results/."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import tempfile
from pathlib import Path

import torch

from ddpm_fast.argtypes import non_negative_int, positive_int
from ddpm_fast.commands.train import build_parser
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.run import build_run

from .common import bench_env, timed, write_result
from .profile_step import Workload, step_gflop


def shape(text: str) -> tuple[str, list[str]]:
    """NAME=FLAGS -> (NAME, the flags split as a shell would)."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS (FLAGS may be empty), got {text!r}")
    try:
        return name, shlex.split(flags)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def config(name: str, flags: list[str]) -> TrainConfig:
    """The TrainConfig the trainer's parser and checks give `flags` (its --out is set when the run
    is built). A flag they refuse is a ValueError naming the shape and the trainer's message."""
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(flags)
        if unknown:
            raise ValueError(f"unrecognised {' '.join(unknown)}")
        return TrainConfig.from_args(args)
    except (argparse.ArgumentError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shape_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=shape, action="append", required=True,
                   help="NAME=FLAGS: a config as python -m ddpm_fast.train flags (repeat; the first is the base)")
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=30, help="timed steps per shape and round")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps per shape and round")
    args = p.parse_args(argv)
    names = [n for n, _ in args.shape]
    if len(set(names)) < len(names):
        p.error(f"argument --shape: a name given twice in {names}")
    try:  # every shape checked before any is built
        args.configs = {name: config(name, flags) for name, flags in args.shape}
    except ValueError as e:
        p.error(f"argument --shape: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="shape_time_") as tmp:  # each run's --out (build_run writes nothing)
        rows = measure(args, Path(tmp))
    env = bench_env(rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    write_result("shape_time", {"env": env, "rows": rows})
    print("| shape | flags | ms/step | x base | parameters (M) | GFLOP/step |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | `{r['flags']}` | {r['ms_per_step']} ({r['min']}-{r['max']}) | {r['x_base']} "
              f"| {r['params_m']} | {r['gflop_per_step']} |")
    return 0


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Build every shape's run, time the rounds, and return a row per shape."""
    runs, steps = {}, {}
    for name, cfg in args.configs.items():
        run = build_run(dataclasses.replace(cfg, out=str(tmp / name)))
        model = run.cfg.model  # with what build_run resolves (the channels of the data)
        x0 = torch.rand(run.cfg.batch_size, model["in_ch"], model["image_size"], model["image_size"],
                        device=run.plan.device) * 2 - 1
        # a class-conditional shape steps on (images, labels), as its loader would feed it
        batch = (x0, torch.randint(model["num_classes"], (len(x0),), device=x0.device)) \
            if model.get("num_classes") else x0
        counter = iter(range(run.total))
        runs[name] = run
        steps[name] = (lambda r=run, c=counter, b=batch: r.step_fn(next(c), b))
    ms = {name: [] for name in args.configs}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.warmup):
                step()
            _, s = timed(lambda: [step() for _ in range(args.steps)])
            ms[name].append(1000 * s / args.steps)
    base = statistics.median(ms[args.shape[0][0]])
    rows = []
    for name, flags in args.shape:
        median, cfg = statistics.median(ms[name]), runs[name].cfg
        work = Workload(steps[name], dict(cfg.model), cfg.batch_size, train=True)
        rows.append({"shape": name, "flags": shlex.join(flags), "ms_per_step": round(median, 2),
                     "min": round(min(ms[name]), 2), "max": round(max(ms[name]), 2),
                     "x_base": round(median / base, 3), "rounds_ms": [round(v, 2) for v in ms[name]],
                     "params_m": round(sum(p.numel() for p in runs[name].net.parameters()) / 1e6, 3),
                     "gflop_per_step": round(step_gflop(work, cfg.model["image_size"]), 1),
                     "plan": runs[name].plan.describe()})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
