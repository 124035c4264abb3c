"""Markdown for the end-to-end parts of a suite run (benchmarks.report writes them into RESULTS.md,
and the epoch and sampling tables into the README too): one function per part, each taking the
part as its module wrote it and the module's env ({} when the run predates it)."""
from __future__ import annotations

from typing import Callable

from .ceilings import matmul_rate


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table; a None cell shows as "-"."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _x(v: float | None) -> str | None:
    return None if v is None else f"{v:g}x"


def epoch(rows: list[dict], env: dict) -> str:
    quick = " --quick" if env.get("quick") else ""
    head = (f"`python -m benchmarks.epoch{quick}` on {env.get('device', '?')}: preset {env.get('preset', '?')}, "
            f"batch {env.get('batch_size', '?')}, {env.get('image_size', '?')}x{env.get('image_size', '?')}; "
            f"timed steps after warm-up, extrapolated to a {env.get('epoch_images', 57208):,}-image epoch. "
            "x RTX 3090: against the original script's 210 s epoch, and against its 303 img/s (its epoch "
            "taken as all 63,565 images, the conservative ratio).")
    body = md_table(["path", "loader", "epoch s", "img/s", "peak GiB", "warm-up s", "x reference",
                     "x RTX 3090 (epoch)", "x RTX 3090 (img/s)"],
                    [[r["path"], r["loader"], r["epoch_s"], r["img_per_s"], r.get("peak_mem_gib"), r["warmup_s"],
                      _x(r.get("speedup_vs_reference")), _x(r.get("speedup_vs_3090_epoch")),
                      _x(r.get("speedup_vs_3090_img_per_s"))] for r in rows])
    return f"{head}\n\n{body}"


def sample(rows: list[dict], env: dict) -> str:
    quick = " --quick" if env.get("quick") else ""
    head = (f"`python -m benchmarks.sample{quick}` on {env.get('device', '?')}: {env.get('n', '?')} images of "
            f"{env.get('image_size', '?')}x{env.get('image_size', '?')}, preset {env.get('preset', '?')}; "
            "seconds for all the steps (extrapolated from the steps run where fewer).")
    body = md_table(["path", "method", "steps", "steps run", "seconds", "ms/step", "warm-up s", "x reference"],
                    [[r["path"], r["method"], r["steps"], r["steps_run"], r["s"], r["ms_per_step"], r["warmup_s"],
                      _x(r.get("speedup_vs_reference"))] for r in rows])
    return f"{head}\n\n{body}"


def cpu_speed(result: dict) -> str:
    """benchmarks.cpu_speed's tables: training and sampling img/s, median (min-max) over rounds."""
    env = result["env"]

    def rate(r: dict) -> str:
        v = r["img_per_s"]
        return f"{v['median']:g} ({v['min']:g}-{v['max']:g})"

    machine = env.get("cpu") or env.get("device", "?")  # the CPU's model where the run recorded it
    head = (f"`python -m benchmarks.cpu_speed` on {machine} ({env.get('cpu_count', '?')} cores, "
            f"{env.get('threads', '?')} threads), torch {env.get('torch', '?')}: batch {env.get('batch_size', '?')}, "
            f"median (min-max) over {env.get('rounds', '?')} rounds after {env.get('warmup', '?')} warm-up steps; "
            "each row in its own process.")
    train = md_table(["preset", "row", "img/s", "x reference", "x diffusers", "warm-up s", "peak RSS MiB"],
                     [[r["preset"], r["row"], rate(r), _x(r.get("vs_reference")), _x(r.get("vs_diffusers")),
                       r["warmup_s"], r["peak_rss_mib"]] for r in result.get("train", [])])
    out = f"{head}\n\nTraining:\n\n{train}"
    if result.get("sample"):
        n = result["sample"][0]["n"]
        sample = md_table(["preset", "row", f"img/s ({n} images, 20 evaluations)", "x reference", "x diffusers",
                           "warm-up s", "peak RSS MiB"],
                          [[r["preset"], r["row"], rate(r), _x(r.get("vs_reference")), _x(r.get("vs_diffusers")),
                            r["warmup_s"], r["peak_rss_mib"]] for r in result["sample"]])
        out += f"\n\nSampling (the default sampler; diffusers: DDPMPipeline, the same solver):\n\n{sample}"
    return out


def heap(result: dict) -> str:
    """benchmarks.heap's table: a step's ms, faults and peak with freed memory kept and without."""
    env, summ = result["env"], result["summary"]

    def cell(v: dict) -> str:
        return f"{v['median']:g} ({v['min']:g}-{v['max']:g})"

    size = env.get("image_size") or "the preset's size"
    head = (f"`python -m benchmarks.heap` on {env.get('cpu', env.get('device', '?'))}: preset {env.get('preset')} at "
            f"{size}, batch {env.get('batch_size')}, the reference path; each mode's median (min-max) over "
            f"{env.get('pairs')} runs in turn, each the median of {env.get('steps')} steps.")
    rows = [[m, cell(summ[m]["step_ms"]), cell(summ[m]["minor_faults_per_step"]), cell(summ[m]["peak_rss_mib"])]
            for m in ("kept", "system")]
    ratio = summ["kept_over_system"]
    return (f"{head}\n\n" + md_table(["heap", "ms/step", "minor faults/step", "peak RSS MiB"], rows)
            + f"\n\nkept / system, pair by pair: {cell(ratio)}")


def profile(rows: list[dict], env: dict, top: int = 8) -> str:
    head = (f"`python -m benchmarks.profile_step` on {env.get('device', '?')}: torch.profiler, preset "
            f"{env.get('preset', '?')}, batch {env.get('batch_size', '?')} (sampling: {env.get('sample_n', '?')}), "
            "fast path without its CUDA graphs. busy = kernel time / wall time.")
    summary = md_table(["workload", "path", "wall ms/step", "kernel ms/step", "busy", "kernels/step", "by category"],
                       [[r["workload"], r["path"], r["wall_ms_per_step"], r["kernel_ms_per_step"], f"{r['busy']:.0%}",
                         r["kernels_per_step"], ", ".join(f"{c} {s:.0%}" for c, s in r["categories"].items())]
                        for r in rows])
    parts = [head, summary]
    if all("gflop_per_step" in r for r in rows):  # profiles written before the rates lack them
        ceiling = env.get("ceiling")
        dtype, rate = matmul_rate(ceiling) if ceiling else (None, None)
        parts.append(
            "Outside the profiler: ms/step, the GFLOP of its products and convolutions, the rate they make "
            "(all ops; matmul/conv: their profiled ms)"
            + (f", and the floor those GFLOP take at the {dtype} matmul ceiling, {rate:.3g} TFLOP/s "
               f"({ceiling['matmul_n']}-square products):" if ceiling else ":"))
        parts.append(md_table(
            ["workload", "path", "ms/step", "GFLOP/step", "TFLOP/s", "matmul/conv TFLOP/s"]
            + (["floor ms", "x floor"] if ceiling else []),
            [[r["workload"], r["path"], r["ms_per_step"], r["gflop_per_step"], r["TFLOPs"], r["matmul_conv_TFLOPs"]]
             + ([r["floor_ms_per_step"], f"{r['x_floor']:.2f}x"] if ceiling else []) for r in rows]))
    for r in rows:
        parts.append(f"Top kernels, {r['workload']} / {r['path']}:\n\n" + md_table(
            ["share", "ms/step", "calls/step", "category", "kernel"],
            [[f"{k['share']:.1%}", k["ms_per_step"], k["calls_per_step"], k["category"],
              "`" + k["name"][:80].replace("|", "/") + "`"] for k in r["top"][:top]]))
    return "\n\n".join(parts)


def fidelity(part: dict, env: dict) -> str:
    head = (f"`python -m benchmarks.fidelity` on {env.get('device', '?')}: preset {env.get('preset', '?')}, "
            f"{env.get('steps', '?')} steps at batch {env.get('batch_size', '?')}; final loss is the mean of the "
            "last 20% of steps, held-out eps-MSE of the EMA model.")
    body = md_table(["run", "final loss", "held-out eps-MSE", "KID"],
                    [[f"{r['path']}, seed {r['seed']}", f"{r['final_loss']:.4f}", f"{r['heldout_mse']:.4f}",
                      f"{r['kid']:.4f}" if "kid" in r else None] for r in part["runs"]])
    rep = part["report"]

    def pct(d: dict | None) -> str:
        if d is None:
            return "not measured in this run"
        return (f"final loss {100 * d['final_loss_rel']:.2f}%, smoothed curve max {100 * d['curve_max_rel']:.2f}%, "
                f"held-out MSE {100 * d['heldout_mse_rel']:.2f}%")

    def yes_no(ok: bool | None) -> str:
        return {True: "yes", False: "NO", None: "not known yet"}[ok]
    verdict = (f"Fast vs reference, same seed: {pct(rep['fast_vs_reference'])}. Seed-to-seed spread: "
               f"{pct(rep['seed_spread'])}. Within 2% final loss: {yes_no(rep['within_2pct_final_loss'])}; "
               f"held-out MSE within the seed spread: {yes_no(rep['within_seed_spread'])}.")
    return "\n\n".join([head, body, verdict])


def loading(part: dict, env: dict) -> str:
    head = (f"`python -m benchmarks.data_loading` on {part.get('device', '?')}: {part.get('train_images', '?')} "
            f"train images to {part.get('image_size', '?')}x{part.get('image_size', '?')}, batch "
            f"{part.get('batch_size', '?')}; one-time s is the cache build or pipeline setup.")
    body = md_table(["loader", "img/s", "epoch s", "one-time s"],
                    [[r["name"], f"{r['img_per_s']:.0f}", f"{r['epoch_s']:.2f}",
                      f"{r.get('cache_build_s', 0) + r.get('setup_s', 0):.1f}"] for r in part["results"]])
    return f"{head}\n\n{body}"


# part name in the suite's JSON -> (title, renderer), in the order RESULTS.md shows them
RENDERERS: dict[str, tuple[str, Callable[..., str]]] = {
    "epoch": ("One training epoch, reference and fast path", epoch),
    "sample": ("Sampling, reference and fast path", sample),
    "profile": ("Where a step's time goes", profile),
    "fidelity": ("Learning unchanged", fidelity),
    "dali": ("Loading JPEGs", loading),
}
HEADLINE = ("epoch", "sample")  # the parts the README shows
