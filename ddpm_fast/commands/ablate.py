"""python -m ddpm_fast.ablate SPEC: which components of a DDPM matter, measured.

SPEC is a TOML file: a base config, what to vary, the seeds and the budget.

    out = "runs/ablation"        # one run folder per config and seed below it
    steps = 1500                 # optimizer steps of every run
    eval_every = 250             # steps between evaluations (KID and held-out x0-MSE, val split)
    eval_samples = 128           # samples per KID
    seeds = [0, 1]
    sampler = { method = "ddim", steps = 25 }   # the few-step sampler of the evaluations

    [base]                       # any train flag, as TrainConfig's field names
    preset = "tiny"
    batch_size = 32

    [grid]                       # every combination of these, each a config
    prediction = ["eps", "v"]
    loss_weight = ["uniform", "min_snr"]

    [variants]                   # one named change from the base each
    no_attention = { attn_res = [] }
    no_ema = { ema_decay = 0.0 }

A budget in images (`images = 29440` and `eval_images = 14720` in place of `steps` and
`eval_every`) gives every config the same number of training images, so configs of different batch
sizes compare at equal data: each config's steps are its images over its batch_size, which the base
or the config must then set and which must divide both.

Each config trains through build_run (the trainer itself) into its own folder and evaluates KID
(the sampler's x_T fixed per seed) and the held-out x0-MSE at intervals. A killed harness, run
again, continues with the runs and steps not done. It writes `ablation.md` (mean and spread over
the seeds of each config's final KID and x0-MSE, its gain against the base and whether that
exceeds the seed spread (the x0-MSE's only where the config draws the base's noise levels,
NOISE_LEVELS), on how many seeds its KID is below the base's of that seed, and how many steps the
best config needs to reach the base's final KID), `ablation.json` and `ablation_kid.png` (KID
against step). `--dry-run` prints the plan and its estimated time."""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .cli import run as run_cli

SPEC_KEYS = {"out", "steps", "eval_every", "images", "eval_images", "eval_samples", "seeds", "sampler", "base", "grid",
             "variants"}


@dataclass
class Plan:
    out: Path
    steps: int
    eval_every: int
    eval_samples: int
    seeds: list[int]
    sampler: dict
    configs: dict[str, dict]     # name -> train-config changes from the base ("base": {})
    base: dict
    images: int | None = None    # a budget in images: steps and eval_every per config, by its batch size
    eval_images: int | None = None

    def batch_size(self, name: str) -> int | None:
        return (self.base | self.configs[name]).get("batch_size")

    @property
    def unit(self) -> str:
        """What a curve's x counts: steps, or images under a budget in images."""
        return "steps" if self.images is None else "images"

    def describe(self) -> str:
        if self.images is None:
            return f"{self.steps} steps, evaluated every {self.eval_every}"
        steps = ", ".join(f"{name} {self.schedule(name)[0]}" for name in self.configs)
        return f"{self.images} images, evaluated every {self.eval_images} (steps: {steps})"

    def schedule(self, name: str) -> tuple[int, int]:
        """(steps, eval_every) of config `name`."""
        if self.images is None:
            return self.steps, self.eval_every
        batch = self.batch_size(name)
        return self.images // batch, self.eval_images // batch


def load_spec(path: str | Path) -> Plan:
    from ..training.config import TrainConfig

    try:
        spec = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"ablation spec {path}: {e}") from None
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"ablation spec {path}: unknown keys {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    known = {f.name for f in fields(TrainConfig)}
    grid, variants = spec.get("grid", {}), spec.get("variants", {})
    for where, keys in [("base", spec.get("base", {})), ("grid", grid)] + [(f"variants.{n}", v) for n, v in
                                                                           variants.items()]:
        bad = set(keys) - known
        if bad:
            raise ValueError(f"ablation spec {path}: [{where}] sets {sorted(bad)}, which are not train flags")
    configs: dict[str, dict] = {"base": {}}
    base = spec.get("base", {})
    for values in itertools.product(*grid.values()):
        change = dict(zip(grid, values))
        if change and any(base.get(k, getattr(TrainConfig, k)) != v for k, v in change.items()):  # not the base again
            configs["-".join(f"{k}={_text(v)}" for k, v in change.items())] = change
    configs.update(variants)
    plan = Plan(out=Path(spec.get("out", "runs/ablation")), steps=int(spec.get("steps", 1000)),
                eval_every=int(spec.get("eval_every", 250)), eval_samples=int(spec.get("eval_samples", 128)),
                seeds=[int(s) for s in spec.get("seeds", [0, 1])], sampler=spec.get("sampler", {}),
                configs=configs, base=base)
    if "images" in spec or "eval_images" in spec:
        if {"steps", "eval_every"} & set(spec) or not {"images", "eval_images"} <= set(spec):
            raise ValueError(f"ablation spec {path}: a budget is either steps and eval_every or images and "
                             "eval_images")
        plan.images, plan.eval_images = int(spec["images"]), int(spec["eval_images"])
        for name in configs:
            batch = plan.batch_size(name)
            if batch is None:
                raise ValueError(f"ablation spec {path}: a budget in images needs batch_size in [base] or in config "
                                 f"{name}")
            for key in ("images", "eval_images"):
                if getattr(plan, key) % batch:
                    raise ValueError(f"ablation spec {path}: {key} = {getattr(plan, key)} is not a whole number of "
                                     f"config {name}'s batches of {batch}")
    return plan


def _text(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def train_config(plan: Plan, name: str, seed: int, resume: bool):
    from ..training.config import TrainConfig

    out = plan.out / name / f"seed{seed}"
    steps, eval_every = plan.schedule(name)
    kw = plan.base | plan.configs[name] | dict(
        seed=seed, steps=steps, eval_every=eval_every, eval_samples=plan.eval_samples,
        save_every=eval_every, sample_every=steps, out=str(out), resume=str(out) if resume else None,
        sample_method=plan.sampler.get("method", "ddim"), sample_steps=plan.sampler.get("steps", 25))
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return TrainConfig(**kw)


def steps_done(folder: Path) -> int:
    from ..checkpoint import CHECKPOINT_NAME, load_checkpoint

    return load_checkpoint(folder)["step"] if (folder / CHECKPOINT_NAME).exists() else 0


def run_all(plan: Plan) -> None:
    """Train what is not done yet, config by config, seed by seed."""
    from ..training.loop import train

    for name, seed in itertools.product(plan.configs, plan.seeds):
        folder = plan.out / name / f"seed{seed}"
        done = steps_done(folder)
        if done >= plan.schedule(name)[0]:
            continue
        print(f"== ablation: {name}, seed {seed}" + (f" (resuming at step {done})" if done else ""), flush=True)
        train(train_config(plan, name, seed, resume=done > 0))


def curves(folder: Path) -> dict[int, dict]:
    """step -> the run's evaluation (kid, x0_mse), from the --eval-every rows of its metrics.csv."""
    with (folder / "metrics.csv").open() as f:
        return {int(r["step"]): {k: float(r[k]) for k in ("kid", "x0_mse")} for r in csv.DictReader(f) if r.get("kid")}


def training_speeds(folder: Path) -> list[float]:
    """The img/s of the run's logged training rows (evaluations excluded: the trainer times steps)."""
    with (folder / "metrics.csv").open() as f:
        return [float(r["img_per_s"]) for r in csv.DictReader(f) if r.get("img_per_s")]


# What sets the noise levels the held-out x0-MSE averages over (t drawn uniformly from the run's own
# schedule): a config that changes one from the base's averages its error over other levels, where the
# error is larger or smaller whatever the model learnt (at 8 epochs the cosine schedule's models scored
# 0.25 against the linear one's 2.29, at a KID no better: docs/ablation_b16_objective.md), so its
# x0-MSE gain is not reported.
NOISE_LEVELS = ("schedule", "timesteps", "zero_terminal_snr")


def noise_levels(plan: Plan, name: str) -> tuple:
    """Config `name`'s NOISE_LEVELS as its run resolves them (a preset's default schedule included)."""
    cfg = train_config(plan, name, plan.seeds[0], resume=False)
    return tuple(getattr(cfg, k) for k in NOISE_LEVELS)


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(plan: Plan) -> dict:
    """Per config: final KID and x0-MSE (mean, spread over seeds), gain against the base, and its
    KID curve (mean over seeds, per evaluation step)."""
    out: dict = {}
    for name in plan.configs:
        runs = [curves(plan.out / name / f"seed{s}") for s in plan.seeds]
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        row: dict = {"changes": plan.configs[name], "steps": steps}
        if plan.images is not None:
            row["images"] = [s * plan.batch_size(name) for s in steps]
        speeds = [v for s in plan.seeds for v in training_speeds(plan.out / name / f"seed{s}")]
        if speeds:  # the wall-clock price of a config, beside its quality: median over every logged row
            row["img_per_s"] = statistics.median(speeds)
        for metric in ("kid", "x0_mse"):
            if steps and all(metric in r[steps[-1]] for r in runs):
                row[f"{metric}_per_seed"] = [r[steps[-1]][metric] for r in runs]
                row[metric] = mean_spread(row[f"{metric}_per_seed"])
                row[f"{metric}_curve"] = [statistics.fmean(r[s][metric] for r in runs) for s in steps]
        out[name] = row
    base, base_levels = out["base"], noise_levels(plan, "base")
    for name, row in out.items():
        row["x0_mse_comparable"] = noise_levels(plan, name) == base_levels
        for metric in ("kid", "x0_mse"):
            if metric in row and metric in base and (metric == "kid" or row["x0_mse_comparable"]):
                gain = base[metric][0] - row[metric][0]  # lower is better: a positive gain is an improvement
                row[f"{metric}_gain"] = gain
                # beyond the seed spread: larger than either config's seed-to-seed standard deviation
                row[f"{metric}_beyond_spread"] = abs(gain) > max(base[metric][1], row[metric][1])
                # paired by seed: a seed fixes the initial weights, the data order and the KID's x_T alike,
                # so a config below its base on every seed is a finding the seeds' spread can hide
                row[f"{metric}_seeds_below_base"] = sum(
                    c < b for c, b in zip(row[f"{metric}_per_seed"], base[f"{metric}_per_seed"]))
    ranked = [n for n in out if "kid" in out[n]]
    if ranked and "kid" in base:
        best = min(ranked, key=lambda n: out[n]["kid"][0])
        xs = out[best][plan.unit]
        reach = next((x for x, k in zip(xs, out[best]["kid_curve"]) if k <= base["kid"][0]), None)
        out["_best"] = {"config": best, f"{plan.unit}_to_base_final_kid": reach}
    return out


def write_report(plan: Plan, summary: dict) -> Path:
    header = (f"Ablation `{plan.out}`: {plan.describe()}, seeds {plan.seeds}, KID of {plan.eval_samples} samples "
              f"({plan.sampler.get('method', 'ddim')}-{plan.sampler.get('steps', 25)}) against the val split and "
              "held-out x0-MSE, final evaluation; mean ± spread (standard deviation over the seeds). A gain is "
              "the base's figure minus the config's (positive: better); * marks a gain beyond the seed spread; "
              "seeds below base: on how many seeds the config's final KID is below the base's of the same seed; "
              "other noise levels: the config's schedule, T or terminal SNR differs from the base's, so its "
              "x0-MSE averages over other noise levels and is not compared; "
              "train img/s: the median of the runs' logged training speed, evaluations excluded (runs made "
              "at other times or beside other jobs compare only roughly).")
    lines = [header, "",
             "| config | changes | KID | KID gain | seeds below base | x0-MSE | x0-MSE gain | train img/s |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(row: dict, metric: str) -> tuple[str, str]:
        if metric not in row:
            return "-", "-"
        if metric == "x0_mse" and not row["x0_mse_comparable"]:
            return f"{row[metric][0]:.4f} ± {row[metric][1]:.4f}", "other noise levels"
        (m, s), gain = row[metric], row.get(f"{metric}_gain", 0.0)
        return f"{m:.4f} ± {s:.4f}", f"{gain:+.4f}{' *' if row.get(f'{metric}_beyond_spread') else ''}"

    for name, row in summary.items():
        if name.startswith("_"):
            continue
        changes = ", ".join(f"{k}={_text(v)}" for k, v in row["changes"].items()) or "(base)"
        below = "-" if name == "base" or "kid_seeds_below_base" not in row else \
            f"{row['kid_seeds_below_base']}/{len(row['kid_per_seed'])}"
        speed = f"{row['img_per_s']:.1f}" if "img_per_s" in row else "-"
        lines.append(f"| {name} | {changes} | {' | '.join(cell(row, 'kid'))} | {below} | "
                     f"{' | '.join(cell(row, 'x0_mse'))} | {speed} |")
    best = summary.get("_best")
    if best:
        reach = best[f"{plan.unit}_to_base_final_kid"]
        at = f"at step {reach} of {plan.steps}." if plan.unit == "steps" else f"after {reach} of {plan.images} images."
        lines += ["", f"Best final KID: **{best['config']}**; it reaches the base's final KID "
                  + (at if reach is not None else "at no evaluated step.")]
    path = plan.out / "ablation.md"
    path.write_text("\n".join(lines) + "\n")
    (plan.out / "ablation.json").write_text(json.dumps(summary, indent=1))
    plot(plan, summary)
    return path


def plot(plan: Plan, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in summary.items():
        if "kid_curve" in row:
            ax.plot(row[plan.unit], row["kid_curve"], "o-" if name == "base" else ".-", label=name,
                    linewidth=2.5 if name == "base" else 1.2)
    ax.set_xlabel("training images" if plan.unit == "images" else "step")
    ax.set_ylabel(f"KID (mean over seeds {plan.seeds})"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plan.out / "ablation_kid.png", dpi=110)
    plt.close(fig)


def estimate_seconds(plan: Plan) -> float:
    """Seconds for the whole plan: a few timed steps and one timed evaluation of the base config (a
    config of another batch size taken to cost the same per image)."""
    from ..evaluation import generate
    from ..training.loop import grid_sampler
    from ..training.run import build_run

    cfg = train_config(plan, "base", plan.seeds[0], resume=False)
    cfg.out = str(plan.out / "_estimate")
    run = build_run(cfg)
    batches = iter(run.loader)
    run.step_fn(0, next(batches))  # first-call costs out of the timing
    t0 = time.perf_counter()
    for s in range(1, 6):
        run.step_fn(s, next(batches))
    step_s = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    generate(grid_sampler(run), 8, cfg.model["image_size"], run.device)
    sample_s = (time.perf_counter() - t0) / 8
    inception_s = 0.3 if run.device.type == "cpu" else 0.002  # per image, measured on 2 CPU cores
    total = 0.0
    for name in plan.configs:
        steps, eval_every = plan.schedule(name)
        batch, base_batch = plan.batch_size(name), plan.batch_size("base")
        per_image_scale = batch / base_batch if batch and base_batch else 1.0
        total += steps * step_s * per_image_scale + steps // eval_every * plan.eval_samples * (sample_s + inception_s)
    return total * len(plan.seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the ablation's TOML file")
    p.add_argument("--out", help="overrides the spec's out folder")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, train nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    args = p.parse_args(argv)

    def body():
        plan = load_spec(args.spec)
        if args.out:
            plan.out = Path(args.out)
        if args.dry_run:
            for name, change in plan.configs.items():
                done = [steps_done(plan.out / name / f"seed{s}") for s in plan.seeds]
                print(f"{name:40} {change or '(base)'}  steps done per seed: {done}")
            hours = estimate_seconds(plan) / 3600
            print(f"{len(plan.configs)} configs x {len(plan.seeds)} seeds x {plan.describe()}: about {hours:.1f} h "
                  "from scratch on this machine")
            return
        if not args.report_only:
            run_all(plan)
        print(f"wrote {write_report(plan, summarise(plan))}")

    return run_cli("ddpm_fast.ablate", body)


if __name__ == "__main__":
    raise SystemExit(main())
