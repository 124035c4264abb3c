"""--data as a Hugging Face `datasets` dataset: a folder written by `save_to_disk` (a Dataset, or a
DatasetDict, of which the `train` split is taken), or a folder of .parquet or .arrow files (at
its top or in its `data/` folder, as on the Hub). `datasets` is an extra.

The dataset's images are written out once as files, the encoded bytes as stored (no re-encoding),
named by row (`000123.png`) and, for a class-conditional run, filed in one folder per class of the
label column (ClassLabel names, else the values as text): an image folder like any other, so the
90/5/5 split, the validation of undecodable images, the cache and every loader backend work on it
unchanged. It lives in the dataset's state folder, keyed by a fingerprint of the dataset's files
and the columns, and is written to a temporary folder renamed into place, so it is whole or
absent and is reused while the dataset is unchanged."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .listing import STATE_DIRNAME, fingerprint, state_dir

SAVED_MARKERS = ("state.json", "dataset_dict.json")
# Magic bytes of the formats the loaders decode; anything else is named .png, so the
# validation (which goes by content) reports it as undecodable rather than the listing missing it.
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"RIFF", ".webp"))


def data_files(root: Path) -> list[Path]:
    """The parquet or arrow files of a folder that is not a save_to_disk one (top level or data/)."""
    for ext in (".parquet", ".arrow"):
        found = sorted(p for d in (root, root / "data") if d.is_dir() for p in d.glob(f"*{ext}"))
        if found:
            return found
    return []


def is_dataset(root: str | os.PathLike | None) -> bool:
    if root is None or not Path(root).is_dir():
        return False
    root = Path(root)
    return any((root / m).is_file() for m in SAVED_MARKERS) or bool(data_files(root))


def image_folder(root: str | os.PathLike | None, image_column: str = "image",
                 label_column: str | None = None) -> str | os.PathLike | None:
    """`root` itself when it is an image folder (or None, the embedded set); for a dataset, the
    image folder its `image_column` (filed by `label_column` when given) is written out to."""
    if not is_dataset(root):
        return root
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and STATE_DIRNAME not in p.relative_to(root).parts)
    key = hashlib.sha1(f"{fingerprint(root, files)}\0{image_column}\0{label_column}".encode()).hexdigest()[:16]
    out = state_dir(root) / f"images-{key}"
    if not out.is_dir():
        write_images(load(root), root, image_column, label_column, out)
    return str(out)


def load(root: Path):
    """The dataset in `root`, as one `datasets.Dataset`."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"--data {root} is a Hugging Face dataset: pip install datasets "
                          f"(or ddpm-fast[datasets])") from e
    if any((root / m).is_file() for m in SAVED_MARKERS):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise ValueError(f"--data {root} holds the splits {', '.join(ds)}, none named train: save the one "
                                 f"to train on alone")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds
    files = data_files(root)
    if files[0].suffix == ".parquet":
        return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(state_dir(root) / "hf-cache"))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


def write_images(ds, root: Path, image_column: str, label_column: str | None, out: Path) -> None:
    """Write `ds`'s images to the folder `out` (atomically: a temporary folder renamed)."""
    import datasets

    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"{flag} {column}: --data {root} has no such column (its columns: "
                             f"{', '.join(ds.column_names)})")
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(f"--image-column {image_column}: the column holds {type(feature).__name__} "
                         f"values, not images (--data {root})")
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    names = class_names(ds.features[label_column], ds[label_column], label_column) if label_column else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp"))
    try:
        for name in names or ():
            (tmp / name).mkdir()
        row = 0
        columns = [image_column] + ([label_column] if label_column else [])
        for batch in ds.select_columns(columns).iter(batch_size=256):
            for i, image in enumerate(batch[image_column]):
                data = image_bytes(image)
                folder = tmp / names[label_index(ds.features[label_column], batch[label_column][i], names)] \
                    if names else tmp
                (folder / f"{row:06d}{suffix(data)}").write_bytes(data)
                row += 1
        try:
            os.rename(tmp, out)
        except OSError:  # another process (a rank under torchrun) wrote it first: the same content
            if not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def class_names(feature, values, column: str) -> list[str]:
    """The class names of a label column: a ClassLabel's names, else its distinct values as text."""
    import datasets

    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else sorted({str(v) for v in values})
    for name in names:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(f"--label-column {column}: the class name {name!r} cannot name a folder")
    return names


def label_index(feature, value, names: list[str]) -> int:
    import datasets

    if not isinstance(feature, datasets.ClassLabel):
        return names.index(str(value))
    if value is None or not 0 <= int(value) < len(names):
        raise ValueError(f"a row's label {value!r} is none of the {len(names)} classes (--label-column)")
    return int(value)


def image_bytes(image: dict) -> bytes:
    """An undecoded Image value's encoded bytes (stored, or in the file it points to)."""
    if image.get("bytes") is not None:
        return image["bytes"]
    return Path(image["path"]).read_bytes()


def suffix(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return ".png"
