"""Fault probes: what a hostile but ordinary user does to the CLIs at their edges. A signal
during the final save (a real child process, a real signal), a full disk at each command's
writes (ENOSPC simulated at the file writes: CI has no tmpfs), an export onto an existing
pipeline, a JPEG with an EXIF rotation, and out-of-range flag values. Tiny model, 8x8, CPU."""
import csv
import errno
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.training.folder import LOCK_NAME
from test_run_safety import FAST, copy_run, tiny_run  # noqa: F401  (the same small run: a fixture)

train_cli = importlib.import_module("ddpm_fast.commands.train")
sample_cli = importlib.import_module("ddpm_fast.commands.sample")
evaluate_cli = importlib.import_module("ddpm_fast.commands.evaluate")
export_cli = importlib.import_module("ddpm_fast.commands.export")


def metrics_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# -- 1. a signal during the final save --------------------------------------------------------

# The child: the train CLI with torch.save slowed down, so the signal lands while the checkpoint's
# temporary file exists (and is still empty); a marker file says when.
SLOW_SAVE_CHILD = textwrap.dedent("""
    import sys, time, torch
    marker, argv = sys.argv[1], sys.argv[2:]
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        open(marker, "w").close()
        time.sleep(3)
        return real_save(obj, f, *args, **kwargs)

    torch.save = slow_save
    from ddpm_fast.commands.train import main
    raise SystemExit(main(argv))
""")


@pytest.mark.parametrize("signals, code", [
    ((signal.SIGINT,), 130),
    ((signal.SIGTERM,), 143),
    ((signal.SIGINT, signal.SIGINT), 130),  # Ctrl-C twice: the write under way still finishes
], ids=["sigint", "sigterm", "double-ctrl-c"])
def test_a_signal_during_the_final_save_keeps_the_run(tmp_path, signals, code):
    """`--save-every` beyond the run: the final save is its only checkpoint. Main restored the
    signal handlers before it: Ctrl-C then deleted the whole run folder, SIGTERM killed the
    process and left a 0-byte temporary file and the lock, and every step was lost."""
    out, marker = tmp_path / "run", tmp_path / "saving"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_CHILD, str(marker), *FAST, "--steps", "3",
                              "--save-every", "1000", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None and time.time() < deadline, child.communicate()[0]
            time.sleep(0.05)
        assert list(out.glob("checkpoint.pt.*.tmp"))  # the final save is under way
        for sig in signals:
            child.send_signal(sig)
            time.sleep(0.3)
        log, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == code, log
    assert ("stopped once the checkpoint under way was written" if len(signals) == 2
            else "the final checkpoint is saved, at step 3") in log
    assert ckpt_mod.load_checkpoint(out)["step"] == 3
    assert metrics_steps(out) == [1, 2, 3] and (out / "config.json").is_file()
    assert not list(out.glob("*.tmp")) and not (out / LOCK_NAME).exists()


# -- 2. a full disk ---------------------------------------------------------------------------

class FullDisk:
    """Files opened for writing whose name contains `names` get `free` bytes between them; the
    write that would pass it writes what fits and fails with ENOSPC, as a full disk's does."""

    def __init__(self, monkeypatch, *names: str, free: int = 0):
        self.names, self.free = names, free
        real_open = io.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax+") and isinstance(file, (str, os.PathLike)) and \
                    any(n in os.fspath(file) for n in self.names):
                return FullFile(f, self)
            return f

        monkeypatch.setattr("builtins.open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)


class FullFile:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk.free:
            fits = self._disk.free
            self._f.write(data[:fits] if isinstance(data, str) else memoryview(data).cast("B")[:fits])
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: could not write "), lines[0]
    return lines[0]


def test_full_disk_at_the_first_checkpoint_keeps_the_run_folder(tmp_path, monkeypatch, capsys):
    """The first checkpoint does not fit: main removed the whole run folder (metrics.csv,
    config.json) and its error named no bytes."""
    out = tmp_path / "run"
    FullDisk(monkeypatch, "checkpoint.pt", free=1000)
    assert train_cli.main(FAST + ["--steps", "3", "--save-every", "2", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.train")
    assert f"could not write {out / 'checkpoint.pt'}: No space left on device (" in line
    needed = int(line.split(" bytes needed")[0].rsplit("(", 1)[1].replace(",", ""))
    assert needed > 4 * 1_000_000  # model, EMA and Adam's two moments of a 1.08M-parameter model, in fp32
    assert metrics_steps(out) == [1, 2] and (out / "config.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.csv", "samples"]


def test_full_disk_at_a_later_checkpoint_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    """A real torch.save into a full file: main's error was a chained traceback (OSError, then
    torch's RuntimeError 'enforce fail at inline_container.cc'), exit status 1."""
    run = copy_run(tiny_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    FullDisk(monkeypatch, "checkpoint.pt", free=200_000)  # the zip's first records fit, then not
    assert train_cli.main(["--resume", str(run), "--steps", "4", "--save-every", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.train")
    assert f"{run / 'checkpoint.pt'}: No space left on device" in line and "checkpoint.pt is as it was" in line
    assert (run / "checkpoint.pt").read_bytes() == before
    assert metrics_steps(run) == [1, 2, 3]  # the resumed run's rows and the step it trained
    assert not list(run.glob("*.tmp")) and not (run / LOCK_NAME).exists()


@pytest.mark.parametrize("argv", [
    ["--n", "2", "--out", "{d}/grid.png"],
    ["--n", "3", "--individual", "--out", "{d}/each"],
    ["--n", "2", "--gif", "--out", "{d}/chain.gif"],
], ids=["grid", "individual", "gif"])
def test_full_disk_in_sample_leaves_no_file(tiny_run, tmp_path, monkeypatch, capsys, argv):
    """main left 0-byte or partial PNGs and named no file."""
    d = tmp_path / "s"
    FullDisk(monkeypatch, str(d), free=120)
    argv = [a.format(d=d) for a in argv]
    assert sample_cli.main(["--ckpt", str(tiny_run), "--method", "ddim", "--steps", "2", *argv]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.sample")
    assert "No space left on device (" in line and "bytes needed" in line
    assert not [p for p in d.rglob("*") if p.is_file()]


def test_full_disk_in_evaluate_keeps_the_json(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e.json"
    out.write_text('{"earlier": true}\n')
    FullDisk(monkeypatch, "e.json", free=10)
    assert evaluate_cli.main(["--ckpt", str(tiny_run), "--images", "4", "--bpd-images", "0", "--json", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.evaluate")
    assert f"could not write {out}: No space left on device (" in line and "e.json is as it was" in line
    assert out.read_text() == '{"earlier": true}\n' and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["folder", "safetensors"])
def test_full_disk_in_export_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys, kind):
    """main: a safetensors traceback, and a partial unet/config.json left behind."""
    target = tmp_path / ("pipe" if kind == "folder" else "model.safetensors")
    FullDisk(monkeypatch, str(tmp_path / ("pipe" if kind == "folder" else "model")), free=0)
    flag = "--out" if kind == "folder" else "--safetensors"
    assert export_cli.main(["--ckpt", str(tiny_run), flag, str(target)]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.export")
    assert f"could not write {target}: No space left on device (" in line
    assert list(tmp_path.iterdir()) == []


# -- 3. export onto something already there ---------------------------------------------------

def test_export_refuses_a_non_empty_target_unless_overwrite(tiny_run, tmp_path, capsys):
    pytest.importorskip("diffusers")
    pipe, st = tmp_path / "pipe", tmp_path / "model.safetensors"
    pipe.mkdir()
    (pipe / "model_index.json").write_text('{"another": "pipeline"}')
    (pipe / "unet").mkdir()
    (pipe / "unet" / "config.json").write_text("{}")
    st.write_bytes(b"another model")
    assert export_cli.main(["--ckpt", str(tiny_run), "--out", str(pipe)]) == 2
    err = capsys.readouterr().err
    assert f"--out {pipe} is not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert export_cli.main(["--ckpt", str(tiny_run), "--safetensors", str(st)]) == 2
    assert f"--safetensors {st} exists" in capsys.readouterr().err
    assert (pipe / "model_index.json").read_text() == '{"another": "pipeline"}' and st.read_bytes() == b"another model"
    # --overwrite: replaced whole (the old unet/config.json gone with it), and it loads back.
    assert export_cli.main(["--ckpt", str(tiny_run), "--out", str(pipe), "--overwrite"]) == 0
    assert export_cli.main(["--ckpt", str(tiny_run), "--safetensors", str(st), "--overwrite"]) == 0
    assert json.loads((pipe / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert json.loads((pipe / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    ref = ckpt_mod.load_model(tiny_run)[0].state_dict()
    for path in (pipe, st):
        got = ckpt_mod.load_model(path)[0].state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "pipe"]  # no leftovers
    # An empty folder is no one's: exported into without --overwrite.
    (tmp_path / "empty").mkdir()
    assert export_cli.main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "empty")]) == 0


# -- 4. EXIF orientation ----------------------------------------------------------------------

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False


@pytest.fixture()
def rotated_jpegs(tmp_path) -> Path:
    """Portrait pictures (grey, a red band at the top, a blue one at the left) stored with EXIF
    Orientation 6: shown upright, they are landscape, blue at the top and red at the right."""
    root = tmp_path / "imgs"
    root.mkdir()
    a = np.full((40, 24, 3), 128, np.uint8)
    a[:14] = (255, 0, 0)
    a[:, :6] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    for i in range(4):
        Image.fromarray(a).save(root / f"r{i}.jpg", quality=95, exif=exif.tobytes())
    return root


def load_all(root: Path, backend: str, **kw) -> torch.Tensor:
    import warnings

    from ddpm_fast.data import build_loader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(root, 16, 4, split="all", drop_last=False, device="cpu", flip=False, backend=backend,
                              **kw)
    loader.set_epoch(0)
    return torch.cat(list(loader))


@pytest.mark.parametrize("backend", ["torch", "cache"])
def test_exif_orientation_is_applied_by_the_pil_loaders(rotated_jpegs, backend, monkeypatch, tmp_path):
    """main decoded the stored (sideways) pixels."""
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "state"))
    x = load_all(rotated_jpegs, backend, num_workers=0) if backend == "torch" else load_all(rotated_jpegs, backend)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    # Upright and centre-cropped to 16x16: the blue band along the top, the red one at the right.
    assert (x[:, :, 0, 8] - blue).abs().max() < 0.2 and (x[:, :, 8, -1] - red).abs().max() < 0.2
    assert x[:, :, 8, 8].abs().max() < 0.1  # grey in the middle


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")
def test_exif_orientation_pil_matches_dali(rotated_jpegs):
    """The same rotated JPEG through PIL (torch loader) and DALI's CPU decoder: one image."""
    pil, dali = load_all(rotated_jpegs, "torch", num_workers=0), load_all(rotated_jpegs, "dali", num_workers=1)
    assert pil.shape == dali.shape == (4, 3, 16, 16)
    assert ((pil - dali).abs() * 127.5).max() <= 12  # decoding and resize rounding (test_data_dali's bound)


def test_prepare_writes_upright_copies(rotated_jpegs, tmp_path, monkeypatch):
    from ddpm_fast.data.listing import validate_images
    from ddpm_fast.data.prepare_folder import write_processed

    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "state"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_processed(validate_images(rotated_jpegs), tmp_path / "prepared", 16, workers=1)
    a = np.asarray(Image.open(tmp_path / "prepared" / "r0.png"), dtype=np.int16)
    assert abs(a[0, 8] - (0, 0, 255)).max() < 25 and abs(a[8, -1] - (255, 0, 0)).max() < 25


# -- 5. flag values ---------------------------------------------------------------------------

@pytest.mark.parametrize("main, argv, flag", [
    (train_cli.main, ["--warmup", "-1"], "--warmup"),
    (train_cli.main, ["--grad-clip", "-1"], "--grad-clip"),
    (train_cli.main, ["--workers", "-1"], "--workers"),
    (train_cli.main, ["--seed", "-1"], "--seed"),
    (train_cli.main, ["--dropout", "1.5"], "--dropout"),
    (train_cli.main, ["--ema-decay", "2"], "--ema-decay"),
    (train_cli.main, ["--adam-beta2", "1"], "--adam-beta2"),
    (train_cli.main, ["--weight-decay", "-0.1"], "--weight-decay"),
    (train_cli.main, ["--eval-every", "-5"], "--eval-every"),
    (train_cli.main, ["--lr", "0"], "--lr"),
    (sample_cli.main, ["--ckpt", "x", "--seed", "-1"], "--seed"),
    (sample_cli.main, ["--ckpt", "x", "--recover", "-3"], "--recover"),
    (sample_cli.main, ["--ckpt", "x", "--eta", "-1"], "--eta"),
    (evaluate_cli.main, ["--ckpt", "x", "--kid", "-1"], "--kid"),
    (evaluate_cli.main, ["--ckpt", "x", "--bpd-images", "-2"], "--bpd-images"),
])
def test_a_numeric_flag_out_of_range_is_refused_at_parse_time(main, argv, flag, capsys, tmp_path, monkeypatch):
    """main accepted --warmup, --grad-clip and --workers -1 and ran; --seed -1 failed only after
    the run started, without naming the flag."""
    monkeypatch.chdir(tmp_path)
    if main is train_cli.main:  # should the flag be accepted, a one-step run, not the default's 8 epochs
        argv = FAST + ["--steps", "1"] + argv
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected " in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_recover_beyond_the_schedule_is_one_line(tiny_run, tmp_path, capsys):
    """main: an IndexError traceback (T = 20 here; the issue's 5000 on T = 1000)."""
    out = tmp_path / "r.png"
    assert sample_cli.main(["--ckpt", str(tiny_run), "--recover", "20", "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--recover 20:" in err and "T = 20" in err and "0 to 19" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert sample_cli.main(["--ckpt", str(tiny_run), "--recover", "19", "--n", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 8 + 5 * 2, 2 * 8 + 3 * 2)  # 4 columns of 2 images, 2-pixel padding


def test_sample_out_folder_is_named(tiny_run, tmp_path, capsys):
    """main: 'unknown file extension'."""
    assert sample_cli.main(["--ckpt", str(tiny_run), "--n", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a folder" in err and "--individual" in err
    assert sample_cli.main(["--ckpt", str(tiny_run), "--n", "2", "--out", str(tmp_path / "grid.pgx")]) == 2
    assert "not an image file name" in capsys.readouterr().err


def test_resume_into_another_folder_keeps_the_runs_metrics(tiny_run, tmp_path):
    """--resume A --out B: main started B's metrics.csv at the resumed step, without A's rows."""
    a = copy_run(tiny_run, tmp_path / "a")
    assert train_cli.main(["--resume", str(a), "--out", str(tmp_path / "b"), "--steps", "3"]) == 0
    assert metrics_steps(tmp_path / "b") == [1, 2, 3] and metrics_steps(a) == [1, 2]


def test_a_skipped_file_warning_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """main printed Python's warning format: the source file, line number and code line."""
    monkeypatch.setenv("DDPM_FAST_CACHE", str(tmp_path / "state"))
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 90, 30)).save(data / f"ok{i}.png")
    (data / "broken.png").write_bytes(b"not a png")
    assert evaluate_cli.main(["--ckpt", str(tiny_run), "--data", str(data), "--split", "train", "--images", "2",
                              "--bpd-images", "0"]) == 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert line.startswith("ddpm_fast.evaluate: warning: skipped 1 of 7 files under ") and "broken.png" in line
    assert ".py:" not in line


def test_full_disk_at_a_metrics_row_leaves_whole_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    FullDisk(monkeypatch, "metrics.csv", free=400)  # the header and a few rows, then the disk is full
    assert train_cli.main(FAST + ["--steps", "50", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "ddpm_fast.train")
    assert f"could not write {out / 'metrics.csv'}: No space left on device (" in line
    text = (out / "metrics.csv").read_text()
    assert text.endswith("\n") and 1 <= len(metrics_steps(out)) < 10
    assert all(len(row.split(",")) == len(text.splitlines()[0].split(",")) for row in text.splitlines())
