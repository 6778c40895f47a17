"""A captioned corpus made on the fly: rendered scenes of one coloured shape at a position, with a caption
that describes it in one of many phrasings.

Colour, shape and position vary independently and the caption's wording varies too, so a text tower has
to read the words rather than memorize one string per class. The label (`<colour> <shape>`) is only for
zero-shot evaluation; pretraining never sees it.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
          "middle": (0.5, 0.5)}
PHRASES = (
    "a {colour} {shape} on the {place}", "a {shape} in {colour}, {place}", "there is a {colour} {shape} at the "
    "{place}", "{place}: one {colour} {shape}", "a picture of a {colour} {shape}", "the {shape} is {colour}",
    "a small {colour} {shape} near the {place}", "a drawing of a {shape}, coloured {colour}",
)


def render(colour: str, shape: str, place: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(90, 170, 3))  # a random grey-ish background, not a class cue
    img = Image.new("RGB", (size, size), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    cx, cy = (np.array(PLACES[place]) + rng.uniform(-0.06, 0.06, 2)) * size
    r = size * rng.uniform(0.14, 0.22)
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)  # type: ignore[arg-type]
    elif shape == "square":
        draw.rectangle(box, fill=fill)  # type: ignore[arg-type]
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)  # type: ignore[arg-type]
    return img


def scenes(n: int, seed: int) -> dict[str, list[str] | list[bytes]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"image": [], "caption": [], "label": [], "key": []}  # type: ignore[type-arg]
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        place = rng.choice(list(PLACES))
        buf = BytesIO()
        render(colour, shape, place, rng).save(buf, format="PNG")
        out["image"].append(buf.getvalue())
        out["caption"].append(str(rng.choice(PHRASES)).format(colour=colour, shape=shape, place=place))
        out["label"].append(f"{colour} {shape}")
        out["key"].append(f"scene-{seed}-{i:06d}")
    return out


def write_scenes(root: Path, *, n_train: int = 4000, n_test: int = 600, shards: int = 4,
                 seed: int = 0) -> dict[str, Path]:
    """Parquet shards (image, caption, label, key) under root/train and root/test."""
    paths = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        data = scenes(n, s)
        k = shards if split == "train" else 1
        for j in range(k):
            part = {c: v[j::k] for c, v in data.items()}
            table = pa.table({"image": pa.array(part["image"], type=pa.binary()),
                              **{c: pa.array(part[c], type=pa.string()) for c in ("caption", "label", "key")}})
            pq.write_table(table, folder / f"part-{j:03d}.parquet")
        paths[split] = folder
    return paths
