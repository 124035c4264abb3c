"""The real image set of benchmarks.real_data: every glyph of Debian's fonts-noto-color-emoji package
(Google's Noto Color Emoji, NotoColorEmoji.ttf), one PNG per single code point, in one flat folder that
ddpm-fast's loader splits 90/5/5 (ddpm_fast/data/split.py).

Why this set: it is real artwork nobody here made, a few thousand colour images of one style (a set of
the size a small model learns on a CPU), and installable offline from the Debian package registry, so
anyone can rebuild exactly these images.

Glyphs: the font's cmap, read with fontTools (a dependency of matplotlib, which the benchmark plots
with), single code points only; the sequences (flags, ZWJ families, keycaps, skin tones applied) are left
out, and so are the control characters and every code point that draws nothing (space, ZWJ,
variation selectors, tags). The font is
a CBDT bitmap font with one strike, 109 px per em (a 136x128 glyph box), so each glyph is drawn at that
size, its ink centred on a 136x136 square and scaled down with LANCZOS.

Background: mid grey (128, 128, 128), not white. It is 0 in the model's [-1, 1] range, so most of every
image sits where the sampler's x0 clip at +-1 does not bend it, and the white (eyes, clouds, ghosts) and
black (outlines) parts of the glyphs stay visible against it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ddpm_fast.files import atomic_write

PACKAGE = "fonts-noto-color-emoji"
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
INSTALL = f"apt-get update && apt-get install -y {PACKAGE}"
STRIKE_PX = 109  # the one bitmap size the font holds; FreeType refuses other sizes of a CBDT font
CANVAS = 136  # the glyph box is 136x128: a square of its width holds any glyph's ink
BACKGROUND = (128, 128, 128)
MANIFEST = "emoji.json"  # what the folder holds, so a later run reuses it only when it is the same set


class FontMissing(RuntimeError):
    """NotoColorEmoji.ttf is not installed (and could not be installed here)."""


@dataclass
class EmojiSet:
    folder: Path
    code_points: list[int]  # one PNG each, u<HEX>.png
    blank: int              # code points of the cmap that draw nothing, left out
    built: bool             # rendered by this call (False: the folder already held this set)


def font_file(install: bool = True) -> Path:
    """NotoColorEmoji.ttf; when missing and `install`, installed with apt-get if this runs as root."""
    if FONT.is_file():
        return FONT
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{FONT} is missing: installing Debian's {PACKAGE} ({INSTALL})", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", PACKAGE]):
            subprocess.run(cmd, check=False)
        if FONT.is_file():
            return FONT
    raise FontMissing(f"{FONT} is missing; install Debian's {PACKAGE} package, as root: {INSTALL}")


def code_points(font: Path) -> list[int]:
    """The single code points the font maps to a glyph, in order, but control characters (the font
    maps NUL and CR, which the text layout refuses to draw)."""
    from fontTools.ttLib import TTFont

    with TTFont(font, lazy=True) as f:
        return sorted(cp for cp in f.getBestCmap() if unicodedata.category(chr(cp)) != "Cc")


def render(font: ImageFont.FreeTypeFont, cp: int, size: int) -> Image.Image | None:
    """The glyph of `cp` as a size x size RGB image on BACKGROUND, or None when it draws nothing."""
    glyph = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), chr(cp), font=font, embedded_color=True)
    box = glyph.getchannel("A").getbbox()
    if box is None:
        return None
    ink = glyph.crop(box)
    square = Image.new("RGBA", (CANVAS, CANVAS), (*BACKGROUND, 255))
    square.alpha_composite(ink, ((CANVAS - ink.width) // 2, (CANVAS - ink.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def file_name(cp: int) -> str:
    return f"u{cp:05X}.png"


def build_emoji_set(folder: str | os.PathLike, size: int, limit: int | None = None,
                    install: bool = True) -> EmojiSet:
    """The emoji set at `size` px in `folder` (--data-dir), rendered unless the folder already holds
    exactly it; `limit`: that many glyphs, evenly spaced over the code points (a smoke run's)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--data-dir {folder} is a file, not a folder")
    font = font_file(install)
    key = {"font": str(font), "font_sha1": hashlib.sha1(font.read_bytes()).hexdigest(), "image_size": size,
           "background": list(BACKGROUND), "limit": limit}
    old = _manifest(folder)
    if old is not None and {k: old.get(k) for k in key} == key \
            and all((folder / file_name(cp)).is_file() for cp in old["code_points"]):
        return EmojiSet(folder, old["code_points"], old["blank"], built=False)
    if old is None and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"--data-dir {folder} is not empty and holds no emoji set of this benchmark (no {MANIFEST}); "
                         f"give a new or empty folder")
    for cp in old["code_points"] if old else ():  # another size, limit or font version: this set replaces it
        (folder / file_name(cp)).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    pil_font = ImageFont.truetype(str(font), STRIKE_PX)
    cmap = code_points(font)
    images = {cp: im for cp in tqdm(cmap, desc=f"rendering {font.name} at {size} px", leave=False)
              if (im := render(pil_font, cp, size)) is not None}
    kept = sorted(images)
    if limit is not None:
        kept = [kept[i * len(kept) // limit] for i in range(min(limit, len(kept)))]
    for cp in kept:
        images[cp].save(folder / file_name(cp))
    blank = len(cmap) - len(images)
    atomic_write(folder / MANIFEST, json.dumps({**key, "package": PACKAGE, "code_points": kept, "blank": blank}))
    return EmojiSet(folder, kept, blank, built=True)


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
