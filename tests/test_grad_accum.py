"""--grad-accum N: one optimizer step per batch, run as N micro-batches of batch / N. The step must
be the one of N=1 (fp32, same images, same noise) to float tolerance; the logs count optimizer
steps; under DDP the gradients are reduced once per step; a resume continues exactly."""
import copy
import csv
import importlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from ddpm_fast.diffusion import GaussianDiffusion
from ddpm_fast.model import UNet
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.ema import EMA
from ddpm_fast.training.step import TrainStep, lr_factor, make_lr_scheduler, make_optimizer

train_cli = importlib.import_module("ddpm_fast.commands.train")

SMALL = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--warmup", "3",
         "--log-every", "1", "--sample-every", "100000", "--sample-n", "4", "--sample-steps", "5",
         "--timesteps", "100", "--dropout", "0", "--lr", "1e-3",
         "--no-fast"]  # fp32: the micro-batch sums are compared to 1e-4, below bf16's rounding


def rows(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f) if r["loss"]]


def assert_same_function(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """The same network to float tolerance, compared by its outputs. Not weight by weight: a bias
    right before a GroupNorm has an exactly-zero true gradient, so its computed one is rounding
    noise, which Adam's first step (about lr x sign(g)) turns into visible yet harmless moves."""
    nets = []
    for m in (a, b):
        if isinstance(m, dict):
            net = UNet(**m["config"]["model"])
            net.load_state_dict(m["model"])
            m = net
        nets.append(m.eval())
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        torch.testing.assert_close(nets[0](x, t), nets[1](x, t), rtol=1e-3, atol=1e-4)


def assert_same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The gradients the optimizer stepped on (kept in .grad after the step), to float tolerance."""
    ga, gb = [p.grad for p in a.parameters()], [p.grad for p in b.parameters()]
    scale = max(g.abs().max().item() for g in ga)
    for (name, _), x, y in zip(a.named_parameters(), ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale, msg=name)


def one_step(model: torch.nn.Module, net: UNet, grad_accum: int, x0: torch.Tensor, seed: int) -> float:
    """One reference-path (fp32) step of `model` (net, or its DDP wrapper) on x0, noise from `seed`."""
    plan = ExecutionPlan.resolve("cpu", kernels="torch")
    diffusion = GaussianDiffusion(timesteps=100)
    opt = make_optimizer(net, 1e-3, plan)
    sched = make_lr_scheduler(opt, 1e-3, 0, "constant", 10)
    step = TrainStep(model, diffusion, opt, sched, EMA(net, 0.9), plan, 1.0, torch.Generator().manual_seed(seed),
                     grad_accum=grad_accum)
    return float(step(0, x0))


def test_one_step_at_four_micro_batches_is_the_step_at_one():
    torch.manual_seed(0)
    start = UNet(image_size=16, ch=16, ch_mult=(1, 2), attn_res=(8,), num_res_blocks=1, dropout=0.0)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    loss1, loss4 = one_step(a, a, 1, x0, seed=5), one_step(b, b, 4, x0, seed=5)
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert_same_grads(a, b)
    assert_same_function(a, b)
    # The step changed the network: the equality is not that of two untouched copies.
    with pytest.raises(AssertionError):
        assert_same_function(b, start)


def test_ddp_reduces_once_per_step_and_matches(tmp_path):
    """A one-process gloo group: DDP's reducer still runs its communication hook per bucket, so the
    hook's calls count the reductions. With N=4 they must be those of N=1 (no_sync in the first
    three micro-batches), and the step the plain one's."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = UNet(image_size=16, ch=16, ch_mult=(1, 2), attn_res=(8,), num_res_blocks=1, dropout=0.0)
        plain = copy.deepcopy(net)
        x0 = torch.rand(8, 3, 16, 16) * 2 - 1
        counts = {}
        for n in (1, 4):
            model = DistributedDataParallel(copy.deepcopy(net))
            calls = []

            def hook(state, bucket):
                calls.append(bucket.index())
                return allreduce_hook(None, bucket)

            model.register_comm_hook(None, hook)
            one_step(model, model.module, n, x0, seed=5)
            counts[n] = len(calls)
            if n == 4:
                one_step(plain, plain, 1, x0, seed=5)
                assert_same_grads(model.module, plain)
                assert_same_function(model.module, plain)
        assert counts[1] > 0 and counts[4] == counts[1]
    finally:
        dist.destroy_process_group()


def test_cli_grad_accum_matches_and_logs_optimizer_steps(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(one)]) == 0
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(four), "--grad-accum", "4"]) == 0
    r1, r4 = rows(one), rows(four)
    # One row per optimizer step; the 3-step warm-up advances per optimizer step (each row holds the
    # lr its step trained at: 1/3, 2/3, 1, 1 of the peak), not per micro-batch (at the peak by row 1).
    assert [s for s, _, _ in r4] == [1, 2, 3, 4]
    assert [lr for _, _, lr in r4] == pytest.approx([1e-3 * lr_factor(s - 1, 3, "constant", 4) for s in range(1, 5)])
    assert r4[0][2] == pytest.approx(1e-3 / 3)
    assert [lr for _, _, lr in r4] == [lr for _, _, lr in r1]
    assert [loss for _, loss, _ in r4] == pytest.approx([loss for _, loss, _ in r1], rel=1e-4)
    a, b = ckpt_mod.load_checkpoint(one), ckpt_mod.load_checkpoint(four)
    assert_same_function(a, b)
    assert b["batch_in_epoch"] == a["batch_in_epoch"] == 4 and b["config"]["grad_accum"] == 4


def test_resume_may_change_grad_accum_and_continues_in_images(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(full), "--grad-accum", "2"]) == 0
    assert train_cli.main(SMALL + ["--steps", "2", "--out", str(part), "--grad-accum", "2"]) == 0
    assert train_cli.main(SMALL + ["--steps", "4", "--out", str(part), "--resume", "--grad-accum", "4"]) == 0
    assert "changed --grad-accum from 2 to 4" in capsys.readouterr().out
    assert [s for s, _, _ in rows(part)] == [1, 2, 3, 4]
    assert_same_function(ckpt_mod.load_checkpoint(full), ckpt_mod.load_checkpoint(part))


def test_grad_accum_must_divide_the_batch(tmp_path, capsys):
    assert train_cli.main(SMALL + ["--steps", "1", "--out", str(tmp_path / "r"), "--grad-accum", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--grad-accum 3 does not divide the batch of 8 images (--batch-size 8)" in err
    assert not (tmp_path / "r").exists()
