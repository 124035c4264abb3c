"""What the thin CLIs share: clear one-line errors (naming the flag or path) instead of
tracebacks for bad input, and the flags sample and evaluate both take."""
from __future__ import annotations

import argparse
import signal
import sys
import traceback
import warnings
from typing import Callable

from ..argtypes import finite_float, non_negative_float, positive_float, positive_int
from ..plan import COMPILE_HELP, FAST_HELP, KERNELS, ExecutionPlan


def add_debug_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, show its traceback too")


def run(prog: str, body: Callable[[], object], debug: bool = False) -> int:
    """Run a CLI body; expected failures (bad input, a file system's refusal: a full disk, a
    read-only folder) become one line, `prog: error: ...`, and exit status 2; with `debug`
    the traceback follows. Warnings (skipped files) are one line too, `prog: warning: ...`; an
    interrupt exits 128 + its signal."""
    def show(message, category, filename, lineno, file=None, line=None):  # not Python's source-line format
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            body()
    except (ValueError, OSError, ImportError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return 2
    except KeyboardInterrupt as e:  # the shell's convention: 128 + the signal (training's Interrupted names it)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # not "[Errno 28] ...": the reason and the file
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


# The flags sample and evaluate share, written once: how to compute (the execution plan) and how
# to sample.
def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="backend of the fused ops (auto: the reference unless measured faster)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help=FAST_HELP.replace("CUDA graphs", "each step a CUDA-graph replay"))
    # train's flag, but off by default: a sampling run is too short to repay the compile.
    p.add_argument("--compile", default="none", nargs="?", const="default", metavar="MODE",
                   help=COMPILE_HELP + " (default here: none; --compile alone: default)")


def plan_from_args(args: argparse.Namespace) -> ExecutionPlan:
    """The command's plan, this process's heap kept for its model calls where the plan says so."""
    plan = ExecutionPlan.resolve(args.device, fast=args.fast, kernels=args.kernels, compile=args.compile)
    plan.apply_to_process()
    return plan


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    from ..schedulers import DEFAULT_CLIP_X0, DEFAULT_METHOD, DEFAULT_STEPS, METHODS, SPACINGS

    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"sampler (default: {DEFAULT_METHOD}, measured against DDPM-1000)")
    p.add_argument("--steps", type=positive_int,
                   help=f"diffusers' num_inference_steps (default: all T for ddpm and ddim, {DEFAULT_STEPS} for the "
                        "others; Heun: 2 evaluations a step)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="timestep spacing, diffusers' meanings (default: karras for dpmpp_2m_sde, else linspace)")
    p.add_argument("--sigma-min", type=positive_float,
                   help="karras spacing: the lowest noise level evaluated before the last step to 0, in sigma "
                        "space, diffusers' sigma_min (default: for a min-SNR model sqrt(0.1 / gamma), 0.14 at "
                        "gamma 5, where its loss weight is a tenth of full; else the schedule's smallest, 0.01 for "
                        "the linear one)")
    p.add_argument("--sigma-max", type=positive_float,
                   help="karras spacing: the highest noise level, where the chain starts, in sigma space, "
                        "diffusers' sigma_max (default: the schedule's largest or 80, the smaller)")
    p.add_argument("--order", type=positive_int, help="solver order (dpmpp: 2 or 3; unipc: 2 or 3)")
    p.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta")
    p.add_argument("--variance", default="beta", choices=("beta", "posterior"),
                   help="DDPM reverse variance: beta_t or beta-tilde_t")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=DEFAULT_CLIP_X0,
                   help="clamp the predicted x0 to [-1, 1] each step (--no-clip-x0: the plain update)")
    p.add_argument("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen's) instead")
    p.add_argument("--use-clipped-model-output", action=argparse.BooleanOptionalAction,
                   help="with a clip, re-derive eps from the clipped x0 (diffusers' DPM-Solver, Euler) or, with "
                        "--no-..., keep the network's eps (diffusers' DDIM; ddim, euler and dpmpp only); default: "
                        "keep it for the SDE solvers (dpmpp_2m_sde, dpmpp_3m_sde), re-derive otherwise (measured; "
                        "schedulers.py)")
    p.add_argument("--chroma-ode", action=argparse.BooleanOptionalAction,
                   help="dpmpp_2m_sde, dpmpp_3m_sde: take each image's colour means (per-channel means less their "
                        "grey) from the ODE's step, not the SDE's: removes the per-sample hue of an RGB eps model of "
                        "grey data, costs KID on colour data (default: off, the plain update, diffusers')")
    p.add_argument("--mean-prior", action=argparse.BooleanOptionalAction,
                   help="read each x0's channel means with the training data's prior on them (recorded by "
                        "train): samples an RGB model of grey data grey; default: on for grey training data and an "
                        "eps model whose output norm has one channel a group (the tiny preset's), where it was "
                        "measured; --no-...: the plain update, diffusers'")
    p.add_argument("--cfg-scale", type=finite_float, default=1.0,
                   help="classifier-free guidance scale w of a class-conditional model (1: no guidance)")


def sampler_from_args(model, diffusion, args: argparse.Namespace, plan, **overrides):
    """The FastSampler the sampler flags describe, on `plan`."""
    from ..sampling import FastSampler

    kw = dict(method=args.method, steps=args.steps, spacing=args.spacing, sigma_min=args.sigma_min,
              sigma_max=args.sigma_max, order=args.order, eta=args.eta,
              variance=args.variance, clip_x0=args.clip_x0, thresholding=args.thresholding,
              use_clipped_model_output=args.use_clipped_model_output, chroma_ode=args.chroma_ode,
              mean_prior=args.mean_prior, cfg_scale=args.cfg_scale)
    return FastSampler(model, diffusion, **(kw | overrides), plan=plan)
