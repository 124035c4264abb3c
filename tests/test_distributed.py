"""Data-parallel training under torchrun, on CPU with gloo: two processes of the training CLI on
the embedded data (tiny model, 16x16), launched as users do (python -m torch.distributed.run)."""
from __future__ import annotations

import csv
import importlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.config import TRAIN_DEFAULTS
from ddpm_fast.training.distributed import distributed_session, per_rank_batch, rank_device

train_cli = importlib.import_module("ddpm_fast.commands.train")

SMALL = ["--preset", "tiny", "--image-size", "16", "--workers", "0", "--warmup", "0", "--log-every", "1",
         "--sample-every", "100000", "--sample-n", "4", "--sample-steps", "5", "--timesteps", "100",
         "--dropout", "0.1"]
# Runs the training CLI unchanged, but keeps the run the loop builds (its model is
# the DDP-wrapped one under torchrun) and saves its model and EMA per rank when main() returns, so the test
# can compare what each rank ended with, not only what rank 0 wrote.
WORKER = """
import importlib, os, sys
import torch
from ddpm_fast.training import loop

seen = {}
real_build = loop.build_run

def capture(*args, **kwargs):
    seen["run"] = real_build(*args, **kwargs)
    return seen["run"]

loop.build_run = capture
code = importlib.import_module("ddpm_fast.commands.train").main(sys.argv[2:])
net = seen["run"].model
torch.save({"wrapper": type(net).__name__, "model": getattr(net, "module", net).state_dict(),
            "ema": seen["run"].ema.state_dict()}, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
sys.exit(code)
"""
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, target: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target]


def clean_env() -> dict[str, str]:
    """This process's environment without any torchrun variables it may itself run under."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def torchrun(nproc: int, args: list[str], dump: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(dump.parent / "worker.py"), str(dump)] if dump else ["-m", "ddpm_fast.train"]
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump.parent / "worker.py").write_text(WORKER)
    return subprocess.run(torchrun_cmd(nproc, target + args), capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env())


def rows(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An 8-step two-process run, and a 4-step one resumed with two processes to step 8."""
    root = tmp_path_factory.mktemp("ddp")
    full, part = root / "full", root / "part"
    r = torchrun(2, SMALL + ["--batch-size", "8", "--steps", "8", "--out", str(full)], dump=root / "dump")
    assert r.returncode == 0, r.stdout + r.stderr
    r2 = torchrun(2, SMALL + ["--batch-size", "8", "--steps", "4", "--out", str(part)])
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert ckpt_mod.load_checkpoint(part)["step"] == 4
    r3 = torchrun(2, SMALL + ["--batch-size", "8", "--steps", "8", "--out", str(part), "--resume"])
    assert r3.returncode == 0, r3.stdout + r3.stderr
    return {"full": full, "part": part, "dump": root / "dump", "log": r.stdout + r.stderr}


def test_ranks_end_identical_and_rank0_writes_one_run(runs):
    full = runs["full"]
    rank0, rank1 = (torch.load(runs["dump"] / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert rank0["wrapper"] == rank1["wrapper"] == "DistributedDataParallel"
    assert_same_weights(rank0["model"], rank1["model"])
    assert_same_weights(rank0["ema"], rank1["ema"])
    ck = ckpt_mod.load_checkpoint(full)
    assert ck["step"] == 8 and ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    # Saved unwrapped (no `module.` prefix even before loading strips it) and equal to every rank.
    raw = torch.load(full / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in raw["model"])
    assert_same_weights(ck["model"], rank0["model"])
    assert_same_weights(ck["ema"], rank0["ema"])
    # The ranks drew different noise: identical streams would be a DDP run of one rank's batch.
    s0, s1 = (ck["rng_per_rank"][i]["loss"] for i in (0, 1))
    assert not torch.equal(s0, s1)
    # One run folder, written once: one metrics row per logged step, no stray checkpoints.
    assert [s for s, _ in rows(full)] == list(range(1, 9))
    assert sorted(p.name for p in full.glob("*.pt*")) == ["checkpoint.pt"]
    assert (full / "loss.png").is_file() and (full / "samples" / "final.png").is_file()
    log = runs["log"]
    assert log.count("ddpm-fast: preset tiny") == 1 and log.count("done: 8 steps") == 1
    lr = TRAIN_DEFAULTS["tiny"]["lr"]  # the preset's, not multiplied by the 2 ranks
    assert f"global batch 8 (4 per rank x 2 processes; lr not rescaled), lr {lr}," in log


def test_two_process_resume_is_exact(runs):
    assert rows(runs["part"]) == rows(runs["full"])
    a, b = ckpt_mod.load_checkpoint(runs["full"]), ckpt_mod.load_checkpoint(runs["part"])
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


def test_resume_with_one_then_two_processes(runs, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    # A copy of the 8-step two-process run, continued by a plain single process...
    run.mkdir()
    for name in ("checkpoint.pt", "metrics.csv"):
        (run / name).write_bytes((runs["full"] / name).read_bytes())
    assert train_cli.main(SMALL + ["--batch-size", "8", "--steps", "10", "--out", str(run), "--resume"]) == 0
    ck = ckpt_mod.load_checkpoint(run)
    assert ck["step"] == 10 and ck["world_size"] == 1 and ck["batch_in_epoch"] == 10
    assert rows(run)[:8] == rows(runs["full"]) and [s for s, _ in rows(run)] == list(range(1, 11))
    # ...then by two again: rank 1 has no saved RNG state and starts a fresh stream of its own.
    r = torchrun(2, SMALL + ["--batch-size", "8", "--steps", "12", "--out", str(run), "--resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    ck = ckpt_mod.load_checkpoint(run)
    assert ck["step"] == 12 and ck["world_size"] == 2 and ck["batch_in_epoch"] == 12
    assert [s for s, _ in rows(run)] == list(range(1, 13))
    assert all(math.isfinite(v) for _, v in rows(run))
    assert not torch.equal(ck["rng_per_rank"][0]["loss"], ck["rng_per_rank"][1]["loss"])


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 7 .* multiple of 2"):
        per_rank_batch(7, 2)
    assert per_rank_batch(8, 2) == 4
    r = torchrun(2, SMALL + ["--batch-size", "7", "--steps", "2", "--out", str(tmp_path / "run")])
    assert r.returncode != 0
    assert "ddpm_fast.train: error: --batch-size 7 is the global batch" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ctrl_c_stops_all_ranks_at_one_step(tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to the workers: every rank must stop after
    the same step, rank 0 saving a checkpoint, well before torchrun's 30 s kill."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = torchrun_cmd(2, [str(tmp_path / "worker.py"), str(dump)]
                       + SMALL + ["--batch-size", "8", "--steps", "100000", "--out", str(run)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    try:
        deadline = time.time() + TIMEOUT
        # Three logged steps (header + 3 lines): the ranks are in the loop, handlers installed.
        while not ((run / "metrics.csv").exists() and (run / "metrics.csv").read_text().count("\n") >= 4):
            assert proc.poll() is None and time.time() < deadline, "the run did not start logging"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        sent = time.time()
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.time() - sent < 25, out
    assert out.count("interrupted at step") == 1, out
    ck = ckpt_mod.load_checkpoint(run)
    assert 3 <= ck["step"] < 100000
    assert rows(run)[-1][0] == ck["step"]
    rank0, rank1 = (torch.load(dump / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert_same_weights(rank0["model"], rank1["model"])
    assert_same_weights(ck["model"], rank0["model"])


def test_torchrun_of_one_process_is_the_plain_run(monkeypatch):
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    with distributed_session(torch.device("cpu")) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.enabled) == (0, 1, False)
        assert not torch.distributed.is_initialized()


def test_bad_launch_settings_are_clear_errors(monkeypatch, tmp_path, capsys):
    with pytest.raises(ValueError, match="--device cuda:1 .* --device cuda"):
        rank_device(torch.device("cuda:1"), local_rank=0)
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")  # a hand-made launch that forgot the rest
    assert train_cli.main(SMALL + ["--batch-size", "8", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "LOCAL_RANK, WORLD_SIZE not" in err and "torchrun" in err
