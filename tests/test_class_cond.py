"""Class-conditional training: labels from folders (nested folders, a class with one image, an
unreadable file), the stratified split, and the loader's labels following its images."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader
from ddpm_fast.data.build import load_labelled
from ddpm_fast.data.labels import folder_classes, stratified_split
from ddpm_fast.data.listing import validate_images


def write(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), colour, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """cats: 30 dark images (some nested two levels deep), dogs: 20 bright ones, owl: a single
    image, and an unreadable file in dogs."""
    root = tmp_path / "data"
    for i in range(30):
        write(root / "cats" / ("deep/er" if i % 3 == 0 else "") / f"c{i}.png", 20 + i)
    for i in range(20):
        write(root / "dogs" / f"d{i}.png", 200 + i)
    write(root / "owl" / "only.png", 120)
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    return root


def test_labels_are_first_folder_level(folder):
    with pytest.warns(UserWarning, match="skipped 1"):
        listing = validate_images(folder)
    classes = folder_classes(folder, listing.files)
    assert classes.names == ("cats", "dogs", "owl")
    assert classes.counts() == {"cats": 30, "dogs": 20, "owl": 1}
    for f, y in zip(listing.files, classes.labels):
        assert f.relative_to(folder).parts[0] == classes.names[y]


def test_stratified_split_keeps_every_class_in_training(folder):
    keys = [f"k{i}" for i in range(51)]
    labels = (0,) * 30 + (1,) * 20 + (2,)
    parts = {s: stratified_split(keys, labels, s, seed=3) for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(51))  # disjoint and complete
    per_class = {s: np.bincount([labels[i] for i in idx], minlength=3).tolist() for s, idx in parts.items()}
    assert per_class["train"] == [27, 18, 1]  # floor(0.9 n), and the single owl trains
    assert per_class["val"][:2] == [1, 1] and per_class["test"][:2] == [2, 1]
    assert stratified_split(keys, labels, "train", seed=3) == parts["train"]  # seeded
    assert stratified_split(keys, labels, "train", seed=4) != parts["train"]


def test_loader_labels_follow_the_images(folder):
    with pytest.warns(UserWarning):
        loader = build_loader(folder, 8, 4, split="train", backend="torch", num_workers=0, class_cond=True, seed=1)
    assert loader.class_names == ("cats", "dogs", "owl")
    seen = 0
    for x, y in loader:
        # cats are dark, dogs bright, the owl in between: each image's label matches its pixels
        mean = x.mean((1, 2, 3))
        want = torch.where(mean < -0.5, 0, torch.where(mean > 0.3, 1, 2))
        assert torch.equal(y, want)
        seen += len(y)
    assert seen == len(loader) * 4
    images, labels, names = load_labelled(folder, 8, "test")
    assert names == ("cats", "dogs", "owl") and len(images) == len(labels) and 2 not in labels.tolist()


def test_loose_files_and_empty_class_folders_are_named(tmp_path):
    root = tmp_path / "d"
    write(root / "a" / "x.png", 10)
    write(root / "loose.png", 10)
    with pytest.raises(ValueError, match="loose.png lies directly in"):
        build_loader(root, 8, 1, class_cond=True)
    (root / "loose.png").unlink()
    (root / "b").mkdir()
    (root / "b" / "bad.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"class folder .*/b holds no readable image"):
        build_loader(root, 8, 1, class_cond=True)


def test_embedded_classes_and_resume_position():
    loader = build_loader(None, 8, 16, class_cond=True, seed=2)
    assert loader.class_names == ("face", "circle", "square", "triangle")
    batches = list(loader)
    loader.set_epoch(0, start_batch=5)
    x, y = next(iter(loader))
    torch.testing.assert_close(x, batches[5][0])
    assert torch.equal(y, batches[5][1])
