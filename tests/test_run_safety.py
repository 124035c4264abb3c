"""Nothing silently wrong: a resume is the same run, divergence stops the run with its last good
checkpoint, one run per folder, and every expected failure is one line and exit status 2 (tiny
model, 8x8, CPU)."""
import csv
import errno
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import requires_cuda
from ddpm_fast import GaussianDiffusion, UNet
from ddpm_fast.data import build_loader, validate_images
from ddpm_fast.data import listing as listing_mod
from ddpm_fast.evaluation import HeldOutMSE
from ddpm_fast.plan import ExecutionPlan
from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.config import TrainConfig
from ddpm_fast.training.ema import EMA
from ddpm_fast.training.folder import LOCK_NAME, locked
from ddpm_fast.training.step import TrainStep, make_lr_scheduler, make_optimizer

train_cli = importlib.import_module("ddpm_fast.commands.train")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")

# Cheap runs: 8x8 images, T = 20, grids of 2 images in 2 DDIM steps.
FAST = ["--image-size", "8", "--batch-size", "4", "--workers", "0", "--timesteps", "20", "--log-every", "1",
        "--sample-every", "100000", "--sample-n", "2", "--sample-method", "ddim", "--sample-steps", "2"]
# cifar32's training defaults (lr 2e-4, warm-up 5000, 100 epochs) on a model as small as tiny's.
CIFAR_SMALL = ["--preset", "cifar32", "--ch", "32", "--ch-mult", "1,2", "--attn-res", "4", "--num-res-blocks", "1",
               "--dropout", "0"]


def config_json(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert train_cli.main(FAST + ["--steps", "2", "--out", str(out)]) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.csv", "config.json"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


# -- resume means the same run ---------------------------------------------------------------

def test_plain_resume_keeps_a_presets_training_settings(tmp_path, monkeypatch, capsys):
    """A plain --resume used to take the tiny preset's lr, warm-up and epochs; it must keep the
    run's own (cifar32's), continue in the run's folder without --out, and log what changed."""
    monkeypatch.chdir(tmp_path)  # where a resume without --out used to write: runs/default
    run = tmp_path / "c32"
    assert train_cli.main(FAST + CIFAR_SMALL + ["--steps", "2", "--out", str(run)]) == 0
    first = config_json(run)
    assert (first["preset"], first["lr"], first["warmup"], first["epochs"]) == ("cifar32", 2e-4, 5000, 100)
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--steps", "3"]) == 0
    log = capsys.readouterr().out
    assert "preset cifar32" in log and "lr 0.0002," in log and "resuming at step 2" in log
    assert "resume: changed --steps from 2 to 3" in log
    assert not (tmp_path / "runs").exists()
    assert ckpt_mod.load_checkpoint(run)["step"] == 3
    again = config_json(run)
    assert again == first | {"steps": 3, "resume": str(run), "out": str(run)}
    # An allowed change is applied and logged; the rest stays the run's.
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--steps", "4", "--lr", "1e-4", "--warmup", "10"]) == 0
    log = capsys.readouterr().out
    assert "changed --lr from 0.0002 to 0.0001" in log and "changed --warmup from 5000 to 10" in log
    cfg = config_json(run)
    assert (cfg["preset"], cfg["lr"], cfg["warmup"], cfg["epochs"], cfg["model"]) == \
        ("cifar32", 1e-4, 10, 100, first["model"])


@pytest.mark.parametrize("flag, value, saved", [
    ("--preset", "cifar32", "tiny"),
    ("--ch", "48", "32"),
    ("--ch-mult", "1,2", "1,2,2"),
    ("--attn-res", "4", "8"),
    ("--num-res-blocks", "2", "1"),
    ("--dropout", "0.2", "0.0"),
    ("--act", "hardswish", "silu"),
    ("--image-size", "16", "8"),
    ("--schedule", "linear", "cosine"),  # the tiny preset's default: cosine
    ("--timesteps", "50", "20"),
    ("--seed", "3", "0"),
])
def test_a_flag_that_defines_the_run_is_refused_on_resume(tiny_run, tmp_path, flag, value, saved, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    assert train_cli.main(["--resume", str(run), "--steps", "3", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} with --resume" in err and f"trained with {flag} {saved}," in err
    assert len(err.strip().splitlines()) == 1
    assert (run / "checkpoint.pt").read_bytes() == before


def test_another_data_folder_is_refused_on_resume(tiny_run, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    run = copy_run(tiny_run, tmp_path / "run")
    assert train_cli.main(["--resume", str(run), "--data", str(tmp_path / "imgs")]) == 2
    assert f"--data {tmp_path / 'imgs'} with --resume" in capsys.readouterr().err


def test_resumed_config_unit():
    """TrainConfig.resumed without a checkpoint file: the saved settings, the allowed changes,
    a new --epochs dropping the run's --steps, and fields an older checkpoint lacks."""
    parser = train_cli.build_parser()
    saved = TrainConfig(preset="anime64", lr=3e-4, steps=14, ema_decay=0.999).to_dict()
    del saved["max_skips"]  # as a checkpoint of an older version
    ckpt = Path("runs/a/checkpoint.pt")
    cfg = TrainConfig.from_args(parser.parse_args(["--resume", "runs/a", "--epochs", "3", "--ema-decay", "0.99"]))
    assert cfg.explicit == {"resume", "epochs", "ema_decay"}
    r = cfg.resumed(saved, ckpt)
    assert (r.preset, r.lr, r.warmup, r.batch_size, r.epochs, r.steps, r.ema_decay, r.max_skips) == \
        ("anime64", 3e-4, 1000, 128, 3, None, 0.99, 20)
    assert r.out == "runs/a" and r.model == saved["model"] and r.checkpoint == ckpt
    assert r.changes == ["changed --ema-decay from 0.999 to 0.99", "changed --epochs from 100 to 3",
                         "dropped --steps 14, which would override --epochs 3"]
    # A flag given with the run's own value is no change; given ones are told from defaults.
    same = TrainConfig.from_args(parser.parse_args(["--resume", "runs/a", "--preset", "anime64", "--lr", "3e-4"]))
    assert same.resumed(saved, ckpt).changes == []
    with pytest.raises(ValueError, match="--preset tiny with --resume: .* trained with --preset anime64"):
        TrainConfig.from_args(parser.parse_args(["--resume", "runs/a", "--preset", "tiny"])).resumed(saved, ckpt)


def test_the_noise_schedule_is_the_presets_unless_given_and_a_resumed_runs_own():
    """--schedule's default comes from TRAIN_DEFAULTS: cosine for tiny (measured there), linear for
    the other presets and any preset without defaults; a resumed run keeps its saved schedule."""
    assert TrainConfig().schedule == "cosine"
    assert [TrainConfig(preset=p).schedule for p in ("anime64", "cifar32", "dogs64")] == ["linear"] * 3
    assert TrainConfig(schedule="linear").schedule == "linear"
    assert TrainConfig(preset="anime64", schedule="cosine").schedule == "cosine"
    parser = train_cli.build_parser()
    assert "cosine for tiny, else linear" in " ".join(parser.format_help().split())  # unwrapped
    saved = TrainConfig(schedule="linear").to_dict()  # a tiny run from before the default changed
    r = TrainConfig.from_args(parser.parse_args(["--resume", "runs/a"])).resumed(saved, Path("runs/a/checkpoint.pt"))
    assert r.schedule == "linear" and r.changes == []


def test_resume_into_a_folder_of_another_run_is_refused(tiny_run, tmp_path, capsys):
    a, b = copy_run(tiny_run, tmp_path / "a"), copy_run(tiny_run, tmp_path / "b")
    before = (b / "checkpoint.pt").read_bytes()
    assert train_cli.main(["--resume", str(a), "--out", str(b), "--steps", "3"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (b / "checkpoint.pt").read_bytes() == before
    # An --out without a run takes the continued run, and the resumed folder is left as it was.
    assert train_cli.main(["--resume", str(a), "--out", str(tmp_path / "c"), "--steps", "3"]) == 0
    assert ckpt_mod.load_checkpoint(tmp_path / "c")["step"] == 3 and ckpt_mod.load_checkpoint(a)["step"] == 2


# -- the divergence guard ---------------------------------------------------------------------

def test_exploding_lr_stops_with_a_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_cli.main(FAST + ["--lr", "1e6", "--grad-clip", "1e9", "--warmup", "0", "--save-every", "1",
                                  "--steps", "60", "--max-skips", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert "diverged" in line and "lower --lr" in line and "step " in line
    ck = ckpt_mod.load_checkpoint(out)  # loads only finite weights
    assert ck["step"] < 60
    rows = metrics(out)
    assert sum(int(r["skipped"]) for r in rows) >= 3 and rows[-1]["loss"] == ""
    assert int(rows[0]["step"]) == 1 and rows[0]["skipped"] == "0" and float(rows[0]["loss"]) > 0


def test_lr_inf_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--lr", "inf"])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


def build_step(plan: ExecutionPlan, fused: bool = False, grad_clip: float = 1.0) -> TrainStep:
    torch.manual_seed(0)
    model = plan.prepare(UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=(4,), num_groups=8)
                         .to(plan.device))
    opt = make_optimizer(model, 1e-3, plan)
    if fused and not plan.cuda_graphs:  # the optimizer of the graphed path, eagerly on the CPU
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3), fused=True)
    sched = make_lr_scheduler(opt, 1e-3, 0, "constant", 100)
    gen = None if plan.cuda_graphs else torch.Generator(plan.device).manual_seed(1)
    return TrainStep(model, GaussianDiffusion("linear", 20), opt, sched, EMA(model, 0.9), plan, grad_clip, gen,
                     warmup=2)


def snapshot(step: TrainStep) -> list[torch.Tensor]:
    """Everything a step may change: parameters, Adam's moments and step counts, the EMA."""
    state = [t for s in step.opt.state.values() for k, t in sorted(s.items())
             if isinstance(t, torch.Tensor) and (k != "step" or step.opt.param_groups[0].get("fused"))]
    return [t.detach().clone() for t in [*step.params, *state, *step.ema.params]]


def check_guard(step: TrainStep, device: torch.device, good_steps: int) -> None:
    """`good_steps` steps, then a batch with a NaN pixel: skipped (nothing changes, the loss is
    NaN, the streak 1), then a finite batch trains again and the streak is 0."""
    x = torch.rand(6, 2, 3, 8, 8, device=device) * 2 - 1
    for s in range(good_steps):
        assert torch.isfinite(step(s, x[s % 6]))
    before = snapshot(step)
    bad = x[0].clone()
    bad[1, 2, 3, 4] = float("nan")
    loss = step(good_steps, bad)
    assert torch.isnan(loss) and int(step.streak) == 1
    for a, b in zip(before, snapshot(step)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(step(good_steps + 1, x[1])) and int(step.streak) == 0
    moved = [not torch.equal(a, b) for a, b in zip(before, snapshot(step))]
    assert all(moved[:len(step.params)]) and all(torch.isfinite(t).all() for t in snapshot(step))


@pytest.mark.parametrize("fused", [False, True], ids=["plain-adam", "fused-adam"])
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_non_finite_step_changes_nothing(fused, grad_clip):
    """The reference path (plain Adam: a masked update) and the graphed path's optimizer (fused
    Adam: found_inf), with and without clipping."""
    check_guard(build_step(ExecutionPlan(), fused, grad_clip), torch.device("cpu"), good_steps=2)


def test_skip_on_the_first_step_leaves_adams_init():
    """A first step skipped: the moments Adam creates then are its zero init, not NaN."""
    step = build_step(ExecutionPlan())
    x = torch.full((2, 3, 8, 8), float("nan"))
    assert torch.isnan(step(0, x))
    assert all(torch.equal(s["exp_avg"], torch.zeros_like(s["exp_avg"])) for s in step.opt.state.values())
    assert torch.isfinite(step(1, torch.zeros(2, 3, 8, 8)))


@requires_cuda
def test_injected_nan_on_the_graphed_path():
    """The whole-step CUDA graph: a NaN batch replayed through the captured step is skipped on
    the device (fused Adam's found_inf, the EMA's zero weight), and the next replay trains."""
    device = torch.device("cuda", torch.cuda.current_device())
    step = build_step(ExecutionPlan(device=device, channels_last=True, cuda_graphs=True))
    check_guard(step, device, good_steps=4)  # 2 eager warm-up steps, the capture, a replay
    assert step.replay is not None


def test_sample_refuses_non_finite_weights_and_evaluate_writes_valid_json(tiny_run, tmp_path, capsys, monkeypatch):
    run = copy_run(tiny_run, tmp_path / "nan")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    next(iter(ck["ema"].values())).fill_(float("nan"))
    torch.save(ck, run / "checkpoint.pt")  # as an older version, without the guard, saved it
    assert sample_cli.main(["--ckpt", str(run), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pt") in err and "non-finite ema weights" in err
    assert not (tmp_path / "s.png").exists()
    # A non-finite figure is null in evaluate's JSON, and so is one not computed.
    nan = float("nan")
    monkeypatch.setattr("ddpm_fast.evaluation.heldout_mse", lambda *a, **k: HeldOutMSE(nan, nan, (nan, 1.0, None, nan)))
    out = tmp_path / "e.json"
    assert evaluate_cli.main(["--ckpt", str(tiny_run), "--images", "4", "--bpd-images", "0", "--json", str(out)]) == 0

    def strict(text):
        raise AssertionError(f"{text} is not JSON")
    for text in (out.read_text(), capsys.readouterr().out):
        r = json.loads(text, parse_constant=strict)
        assert r["eps_mse"] is None and r["eps_mse_std_err"] is None and r["bits_per_dim"] is None
        assert [r[f"eps_mse_q{q}"] for q in range(4)] == [None, 1.0, None, None]
        assert r["images"] == 4


# -- one run per folder -----------------------------------------------------------------------

def test_second_training_into_a_busy_folder_is_refused(tmp_path, capsys):
    """Two trainings into one --out, the second started while the first runs: it exits 2 naming
    the first's pid, and metrics.csv holds the first run's rows alone."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    first = subprocess.Popen([sys.executable, "-m", "ddpm_fast.train", *FAST, "--steps", "100000", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.csv").exists() and (out / "metrics.csv").read_text().count("\n") >= 3):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
        assert train_cli.main(FAST + ["--steps", "5", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another training (pid {first.pid}" in err
        first.terminate()  # SIGTERM: it saves at a step boundary and exits 143 (128 + 15)
        log, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, log
    steps = [int(r["step"]) for r in metrics(out)]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == ckpt_mod.load_checkpoint(out)["step"]
    assert not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    with locked(run):
        with pytest.raises(FileExistsError, match=f"pid {os.getpid()}"):
            with locked(run):
                pass
        assert train_cli.main(["--resume", str(run), "--steps", "3"]) == 2
    # A lock file a killed run left (its pid, no flock held): taken over, saying so.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(dead.stdout)
    (run / "checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--steps", "3"]) == 0
    log = capsys.readouterr().out
    assert f"took over the lock of process {dead.stdout.strip()}" in log
    assert "removed 1 temporary file(s) of an interrupted write: checkpoint.pt.k1ll3d.tmp" in log
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "loss.png", "metrics.csv",
                                                     "samples"]


# -- one-line errors --------------------------------------------------------------------------

@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"", "is an empty file"),
    (lambda b: b[: len(b) // 2], "could not read checkpoint"),
    (lambda b: b"not a checkpoint at all", "could not read checkpoint"),
])
def test_a_torn_checkpoint_is_one_line(tiny_run, tmp_path, damage, needle, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    path = run / "checkpoint.pt"
    path.write_bytes(damage(path.read_bytes()))
    torn = path.read_bytes()
    for main, argv in ((train_cli.main, ["--resume", str(run)]),
                       (sample_cli.main, ["--ckpt", str(run), "--out", str(tmp_path / "s.png")]),
                       (evaluate_cli.main, ["--ckpt", str(run)])):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err and str(path) in err
    assert path.read_bytes() == torn  # nothing wrote over it
    assert train_cli.main(["--resume", str(run), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_is_one_line_and_keeps_the_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # writes a little, then the disk is full
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_cli.main(["--resume", str(run), "--steps", "4", "--save-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # the progress bar's lines, then one error line
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith(f"ddpm_fast.train: error: could not write {run / 'checkpoint.pt'}: No space left on "
                           f"device (") and line.endswith(" free; checkpoint.pt is as it was)")
    assert ckpt_mod.load_checkpoint(run)["step"] == 2
    assert not list(run.glob("*.tmp")) and not (run / LOCK_NAME).exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_real_full_disk_surfaces_as_enospc(monkeypatch):
    """What the fake writer above stands for: torch.save into the unbuffered file that
    save_checkpoint opens raises the OSError of the failed write."""
    import contextlib

    monkeypatch.setattr(ckpt_mod, "atomic_path", lambda path, size=None: contextlib.nullcontext(Path("/dev/full")))
    with pytest.raises(OSError) as e:
        ckpt_mod.save_checkpoint({"w": torch.ones(10000)}, "unused")
    assert e.value.errno == errno.ENOSPC


def test_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    """A read-only --out, simulated (root writes anywhere): the refusal of its first write."""
    out = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert train_cli.main(FAST + ["--steps", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"ddpm_fast.train: error: Read-only file system: {out}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert train_cli.main(FAST + ["--steps", "1", "--out", str(tmp_path / "ro" / "run")]) == 2
        assert "Permission denied" in capsys.readouterr().err
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_nothing_is_created_before_the_inputs_validate(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert train_cli.main(FAST + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]) == 2
    assert train_cli.main(["--resume", str(tiny_run), "--out", str(tmp_path / "b"), "--ch", "64"]) == 2
    assert train_cli.main(FAST + ["--batch-size", "100000", "--out", str(tmp_path / "c")]) == 2
    assert not any((tmp_path / n).exists() for n in "abc")


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def failing(self, step, x0):
        raise ValueError("the first batch could not be read")

    monkeypatch.setattr(TrainStep, "__call__", failing)
    assert train_cli.main(FAST + ["--steps", "3", "--out", str(tmp_path / "run")]) == 2
    assert "the first batch could not be read" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- validation and decoding agree ------------------------------------------------------------

@pytest.fixture()
def disguised(tmp_path) -> Path:
    """Good PNGs, a GIF and a TIFF with image extensions, and a PNG named .jpg."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(12):
        Image.new("RGB", (12, 12), (20 * i, 90, 30)).save(root / f"ok{i:02d}.png")
    Image.new("RGB", (12, 12), (0, 200, 0)).save(root / "gif.png", format="GIF")
    Image.new("RGB", (12, 12), (0, 0, 200)).save(root / "tiff.jpg", format="TIFF")
    Image.new("RGB", (12, 12), (200, 0, 0)).save(root / "png.jpg", format="PNG")
    return root


def test_validation_checks_the_content_not_the_name(disguised):
    with pytest.warns(UserWarning, match="skipped 2 of 15"):
        listing = validate_images(disguised)
    reasons = {f.name: why for f, why in listing.skipped}
    assert reasons.keys() == {"gif.png", "tiff.jpg"}
    assert reasons["gif.png"].startswith("GIF data in a .png file")
    assert disguised / "png.jpg" in listing.files  # a PNG by any name decodes everywhere


try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")
def test_dali_names_a_file_it_cannot_decode(disguised, monkeypatch):
    """Should a file pass validation that DALI cannot decode (here: validation switched off),
    the loader names it instead of DALI's anonymous pipeline error."""
    monkeypatch.setattr(listing_mod, "check_image", lambda path, max_pixels=0: (None, False))
    loader = build_loader(disguised, 8, 5, split="all", backend="dali", device="cpu", num_workers=1,
                          drop_last=False)
    loader.set_epoch(0)
    with pytest.raises(ValueError, match=r"DALI could not decode .*(gif\.png|tiff\.jpg)"):
        for _ in loader:
            pass

