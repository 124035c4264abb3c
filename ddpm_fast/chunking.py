"""A model's inference calls in chunks. On a CPU a plan caps how many images one call takes
(ExecutionPlan.images_per_call): for memory on every CPU (plan.MEMORY_ELEMENTS), and tighter on a
kind where a large batch measured slower an image than chunks of it on malloc's default heap, when
the heap is not kept (plan.EVAL_ELEMENTS); `in_chunks` applies that cap to the sampler's model
calls. A model's output for one image does not depend on the others in its batch in eval mode, so the
chunks' outputs joined are the batch's: bit for bit in the measurement's chunks of 4 images or
more, to fp32 rounding in smaller ones, where oneDNN picks other algorithms (docs/DESIGN.md,
"Inference in chunks")."""
from __future__ import annotations

from typing import Callable

import torch

from .plan import ExecutionPlan


def model_config(model: Callable) -> dict:
    """A model's config as a mapping: ours is a dict, diffusers' a FrozenDict (a dict too); a compiled
    or DDP-wrapped model's is its inner model's; a plain callable's is empty."""
    inner = getattr(model, "_orig_mod", getattr(model, "module", model))
    config = getattr(inner, "config", None)
    return config if isinstance(config, dict) else {}


def model_width(model: Callable) -> int | None:
    """The channels of a model's top level, the widest activation an image (ExecutionPlan.images_per_call):
    ours (config ch x ch_mult[0]), diffusers' (config.block_out_channels[0]), a compiled or DDP-wrapped
    one's; None for a plain callable."""
    config = model_config(model)
    if "ch" in config:
        return config["ch"] * config["ch_mult"][0]
    widths = config.get("block_out_channels")
    return widths[0] if widths else None


def in_chunks(call: Callable, plan: ExecutionPlan, width: int | None) -> Callable[..., torch.Tensor]:
    """`call` (a model, `(x, t[, y]) -> out`, or a module whose output has `.sample`) as a function of
    the same inputs that returns the output tensor, calling it on chunks of at most the plan's
    images_per_call images (of a model whose top level is `width` wide) where the plan sets a cap,
    the remainder last, and joining their outputs."""
    def chunked(*inputs: torch.Tensor) -> torch.Tensor:
        per_call = plan.images_per_call(width, inputs[0].shape[-1])
        if per_call is None or inputs[0].shape[0] <= per_call:
            parts = [inputs]
        else:
            parts = list(zip(*(v.split(per_call) for v in inputs)))
        outs = [call(*part) for part in parts]
        outs = [out.sample if hasattr(out, "sample") else out for out in outs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    return chunked
