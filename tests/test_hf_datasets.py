"""--data as a Hugging Face `datasets` dataset (save_to_disk, or a parquet folder), built here on
the fly: its images train, an undecodable one is skipped as in a folder, and its ClassLabel
column drives class-conditional training with the label names as class names."""
import importlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from ddpm_fast.data import build_loader  # noqa: E402
from ddpm_fast.data.hf import image_folder  # noqa: E402
from ddpm_fast import checkpoint as ckpt_mod  # noqa: E402

train_cli = importlib.import_module("ddpm_fast.commands.train")

SMALL = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--warmup", "0",
         "--log-every", "1", "--sample-every", "100000", "--sample-n", "4", "--sample-steps", "2",
         "--timesteps", "100"]
# ClassLabel order is not name order: label 0 is "zebra" (red images), 1 is "apple" (blue ones).
NAMES = ["zebra", "apple"]


def png(colour) -> bytes:
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour) + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(n: int = 40, bad: bool = True):
    images, labels = [], []
    for i in range(n):
        label = i % 2
        images.append({"bytes": png((200 + i % 7, 10, 10) if label == 0 else (10, 10, 200 + i % 7)), "path": None})
        labels.append(label)
    if bad:  # a row whose bytes decode to nothing
        images.append({"bytes": b"\x89PNG not really", "path": None})
        labels.append(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "ds"
    make_dataset().save_to_disk(str(path))
    return path


def test_labels_drive_the_classes(saved):
    folder = image_folder(saved, "image", "label")
    assert image_folder(saved, "image", "label") == folder  # written once, then reused
    with pytest.warns(UserWarning, match="skipped 1 of 41"):  # the row of bytes that do not decode
        loader = build_loader(folder, 16, 4, split="train", device="cpu", class_cond=True, flip=False,
                              num_workers=0)
    assert tuple(loader.class_names) == ("apple", "zebra")
    loader.set_epoch(0)
    seen = 0
    for images, labels in loader:
        red = images[:, 0].mean((1, 2)) > images[:, 2].mean((1, 2))
        assert torch.equal(red, labels == loader.class_names.index("zebra"))
        seen += len(labels)
    assert seen == 36 and set(loader.labels.tolist()) == {0, 1}


def test_saved_dataset_trains_class_conditional(saved, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--data", str(saved), "--class-cond", "--steps", "2", "--out", str(out)]) == 0
    assert "classes (2, training images): apple 18, zebra 18" in capsys.readouterr().out
    ck = ckpt_mod.load_checkpoint(out)
    assert tuple(ck["config"]["class_names"]) == ("apple", "zebra") and ck["config"]["model"]["num_classes"] == 2
    # The same run resumes (the dataset is the run's data), and another --label-column is refused.
    assert train_cli.main(SMALL + ["--data", str(saved), "--class-cond", "--steps", "3", "--resume", str(out)]) == 0
    assert train_cli.main(SMALL + ["--steps", "4", "--resume", str(out), "--label-column", "other"]) == 2
    assert "--label-column other with --resume" in capsys.readouterr().err


def test_parquet_folder_trains(tmp_path):
    folder = tmp_path / "pq"
    (folder / "data").mkdir(parents=True)
    make_dataset(bad=False).rename_column("image", "img").to_parquet(str(folder / "data" / "train-0.parquet"))
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--data", str(folder), "--image-column", "img", "--steps", "2",
                                   "--out", str(out)]) == 0
    assert ckpt_mod.load_checkpoint(out)["step"] == 2


@pytest.mark.parametrize("flags, needle", [
    (["--image-column", "picture"], "--image-column picture: --data"),
    (["--class-cond", "--label-column", "breed"], "--label-column breed: --data"),
    (["--image-column", "label"], "--image-column label: the column holds ClassLabel values, not images"),
])
def test_bad_columns_are_one_line_errors(saved, tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert train_cli.main(SMALL + ["--data", str(saved), "--steps", "1", "--out", str(out)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
