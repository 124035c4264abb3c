"""The fast train step against the reference step, on CPU (the CUDA-graph path is GPU-only)."""
import pytest
import torch

from conftest import requires_cuda
from ddpm_fast import GaussianDiffusion, UNet
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast.training.ema import EMA
from ddpm_fast.training.step import TrainStep, make_lr_scheduler, make_optimizer, match_optimizer_to_path


def build(seed=0, device="cpu"):
    torch.manual_seed(seed)
    # num_groups=8: with one channel per group (tiny's default at width 32) GroupNorm cancels the
    # conv biases before it exactly, and Adam would turn their zero-mean rounding noise into
    # +-lr steps that differ between memory formats.
    model = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,), num_groups=8)
    return model, GaussianDiffusion("linear", 100)


def make_step(model, diffusion, plan, steps, gen=None):
    """The step build_run makes for `plan` (warm-up 2, lr 1e-3, clipping at 1)."""
    model = plan.prepare(model)
    ema = EMA(model, 0.999)
    opt = make_optimizer(model, 1e-3, plan)
    return TrainStep(model, diffusion, opt, make_lr_scheduler(opt, 1e-3, 2, "constant", steps), ema, plan, 1.0, gen)


def run(kind, steps, data, dtype=None):
    model, diffusion = build()
    plan = ExecutionPlan() if kind == "reference" else ExecutionPlan(autocast_dtype=dtype, channels_last=True)
    step = make_step(model, diffusion, plan, steps, torch.Generator().manual_seed(1))
    losses = [step(s, data[s % len(data)]).item() for s in range(steps)]
    return step.model, step.ema, losses


def test_fp32_fast_step_follows_reference():
    """Same maths as the reference step; only channels_last convolution reduction order differs."""
    data = torch.rand(4, 6, 3, 8, 8) * 2 - 1
    m_ref, ema_ref, l_ref = run("reference", 6, data)
    m_fast, ema_fast, l_fast = run("fast", 6, data)
    assert l_fast == pytest.approx(l_ref, rel=1e-5)
    # Per tensor, relative to its norm: Adam's early steps are ~lr * sign(grad), so an element
    # whose gradient is ~0 can move by +-lr in either run; the tensors as a whole must agree.
    pairs = list(zip(m_ref.parameters(), m_fast.parameters())) + list(
        zip(ema_ref.model.parameters(), ema_fast.model.parameters()))
    for a, b in pairs:
        assert ((a - b).norm() / a.norm().clamp(min=1e-6)).item() < 1e-3
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in m_fast.parameters() if p.dim() == 4)


def test_bf16_fast_step_learns_like_reference():
    data = torch.rand(8, 16, 3, 8, 8) * 2 - 1
    _, _, l_ref = run("reference", 40, data)
    _, _, l_bf16 = run("fast", 40, data, dtype=torch.bfloat16)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(l_bf16[-10:]) < 0.7 * mean(l_bf16[:5])  # it learns
    assert mean(l_bf16[-10:]) == pytest.approx(mean(l_ref[-10:]), rel=0.1)


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        ExecutionPlan.resolve("cpu", fast=True, cuda_graphs=True)


@requires_cuda
def test_graphed_step_matches_eager_step_on_gpu(monkeypatch):
    """The captured step computes what the eager fast step computes, given the same RNG."""
    data = torch.rand(6, 16, 3, 8, 8, device="cuda") * 2 - 1
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same conv algorithms in both runs
    results = []
    for graph in (False, True):
        model, diffusion = build()
        torch.cuda.manual_seed(3)
        plan = ExecutionPlan(device=torch.device("cuda", torch.cuda.current_device()), channels_last=True,
                             cuda_graphs=graph)
        fast = make_step(model, diffusion, plan, 6)
        losses = [fast(s, data[s]).item() for s in range(6)]
        results.append((losses, [p.detach().clone() for p in fast.model.parameters()]))
    (l0, p0), (l1, p1) = results
    assert l1 == pytest.approx(l0, rel=1e-3)
    # Per tensor, as on the CPU: an element whose gradient is rounding noise (the key bias of an
    # attention block) moves by +-lr wherever a kernel's reduction order differs.
    for a, b in zip(p0, p1):
        assert ((a - b).norm() / a.norm().clamp(min=1e-6)).item() < 1e-3


def test_optimizer_from_the_other_path_is_made_this_paths():
    """A checkpoint of the graphed path (capturable fused Adam, tensor lr, float64 steps) loaded
    for the eager path gets its non-capturable fused Adam, a float lr and float32 steps, and steps;
    so does one saved before the eager Adam was fused (plain Adam's flags)."""
    model, _ = build()
    opt = make_optimizer(model, 1e-3, ExecutionPlan())
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    for g in saved["param_groups"]:  # as a GPU fast run saves it
        g.update(fused=True, capturable=True, lr=torch.tensor(1e-3))
    for st in saved["state"].values():
        st["step"] = st["step"].to(torch.float64)
    opt2 = make_optimizer(model, 1e-3, ExecutionPlan())
    opt2.load_state_dict(saved)
    match_optimizer_to_path(opt2, graphed=False)
    g = opt2.param_groups[0]
    assert (g["fused"], g["capturable"], g["foreach"]) == (True, False, None) and isinstance(g["lr"], float)
    assert all(st["step"].dtype == torch.float32 and st["step"].device.type == "cpu" for st in opt2.state.values())
    opt2.step()
    assert all(st["step"].item() == 2 for st in opt2.state.values())
    older = opt2.state_dict()
    for g in older["param_groups"]:  # as the plain (unfused) CPU Adam of earlier versions saved it
        g.update(fused=None, capturable=False, foreach=None)
    opt3 = make_optimizer(model, 1e-3, ExecutionPlan())
    opt3.load_state_dict(older)
    match_optimizer_to_path(opt3, graphed=False)
    assert opt3.param_groups[0]["fused"] is True
    opt3.step()
    assert all(st["step"].item() == 3 for st in opt3.state.values())


def test_captured_step_body_makes_no_host_read():
    """What the whole-step graph captures (loss with in-graph t and noise, backward, foreach
    clipping, fused Adam with a tensor lr, EMA from a device decay) reads nothing back to the
    host: checked on the CPU with fused Adam, the kind the GPU path captures."""
    from conftest import NoHostSync
    model, diffusion = build()
    plan = ExecutionPlan(channels_last=True)
    step = make_step(model, diffusion, plan, 10)
    step.opt = torch.optim.Adam(step.model.parameters(), lr=torch.tensor(1e-3), fused=True)
    step.sched = make_lr_scheduler(step.opt, 1e-3, 2, "constant", 10)
    x = torch.rand(2, 3, 8, 8)
    step(0, x)  # optimizer state created, as the eager warm-up steps do before capture
    with NoHostSync():  # the host's work between replays (EMA decay, lr schedule) reads nothing back either
        step.ema.set_step(1)
        loss = step._body(x.contiguous(memory_format=torch.channels_last), None)
        step.sched.step()
    assert torch.isfinite(loss)
