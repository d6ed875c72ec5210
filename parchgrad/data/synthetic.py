"""Synthetic object-localization benchmark: the project's embedded default data set.

Each image shows one object of a known class on a background cut from a
photographic texture shipped with scikit-image (brick, grass, gravel), with
colour jitter, plus one to three clutter blobs that belong to no class. A
class is defined by its shape together with its colour and surface pattern
(for example a red striped disc), and the pattern turns with the object.
Ground truth per image: class, bounding box and pixel mask of the object.

The benchmark is generated from a seed and cached on disk in an inspectable
layout::

    <root>/synthetic-<key>/
        config.json             generation config and class names
        labels.csv              one row per image: split, index, image, mask,
                                label, class_name, x0, y0, x1, y1
        images/<split>/NNNNN.png   RGB images
        masks/<split>/NNNNN.png    object masks (0 or 255)

``<key>`` is a hash of the generation config, so a different config never
reuses a folder. Boxes are in pixels, ``x1`` and ``y1`` exclusive, and equal
the bounding box of the mask.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from parchgrad.data.common import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CLASSES",
    "DEFAULT_CONFIG",
    "SPLITS",
    "ObjectClass",
    "SyntheticBenchmark",
    "benchmark_config",
    "benchmark_key",
    "build_synthetic_benchmark",
    "class_names",
    "render_sample",
]

# Bump when the rendering changes, so that caches made by older code are not reused.
GENERATOR_VERSION = 1

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Textures from skimage.data that load from the installed package, without a download.
TEXTURES = ("brick", "grass", "gravel")

DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 96,
    "num_classes": 10,
    "num_train": 4000,
    "num_val": 500,
    "num_test": 500,
    "seed": 0,
    "min_clutter": 1,
    "max_clutter": 3,
    # Object half-size as a fraction of the image side.
    "min_scale": 0.15,
    "max_scale": 0.3,
}


@dataclass(frozen=True)
class ObjectClass:
    """One object class: a shape drawn with a surface pattern in two colours (RGB in [0, 1])."""

    name: str
    shape: str
    pattern: str
    primary: tuple[float, float, float]
    secondary: tuple[float, float, float]


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("red striped disc", "disc", "stripes", (0.85, 0.1, 0.1), (0.95, 0.95, 0.95)),
    ObjectClass("blue checkered square", "square", "checker", (0.1, 0.2, 0.85), (0.95, 0.9, 0.2)),
    ObjectClass("green dotted triangle", "triangle", "dots", (0.1, 0.7, 0.2), (0.05, 0.05, 0.05)),
    ObjectClass("orange plain star", "star", "plain", (1.0, 0.55, 0.0), (1.0, 0.55, 0.0)),
    ObjectClass("purple ringed hexagon", "hexagon", "rings", (0.55, 0.1, 0.7), (0.95, 0.95, 0.95)),
    ObjectClass("cyan zigzag diamond", "diamond", "zigzag", (0.0, 0.85, 0.9), (0.05, 0.05, 0.05)),
    ObjectClass("yellow grid cross", "cross", "grid", (0.95, 0.9, 0.1), (0.6, 0.1, 0.1)),
    ObjectClass("magenta striped ring", "ring", "stripes", (0.9, 0.1, 0.7), (0.95, 0.95, 0.95)),
    ObjectClass("pink dotted heart", "heart", "dots", (1.0, 0.55, 0.7), (0.5, 0.0, 0.2)),
    ObjectClass("white checkered crescent", "crescent", "checker", (0.97, 0.97, 0.97), (0.1, 0.1, 0.1)),
    ObjectClass("lime grid pentagon", "pentagon", "grid", (0.6, 1.0, 0.2), (0.1, 0.3, 0.1)),
    ObjectClass("navy wavy ellipse", "ellipse", "waves", (0.05, 0.1, 0.45), (0.4, 0.8, 1.0)),
)


def class_names(num_classes: int = DEFAULT_CONFIG["num_classes"]) -> list[str]:
    """Return the names of the first ``num_classes`` classes, in label order."""
    _check_num_classes(num_classes)
    return [spec.name for spec in CLASSES[:num_classes]]


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(
            f"num_classes must be between 2 and {len(CLASSES)} (the defined classes), "
            f"got {num_classes!r}."
        )


# ---------------------------------------------------------------------------
# Rendering. Shapes and patterns are functions of object coordinates (u, v):
# the pixel position relative to the object centre, rotated with the object
# and divided by its half-size, so the object spans about [-1, 1] on each axis.


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    apothem = radius * np.cos(np.pi / sides)
    for k in range(sides):
        # Edge normals point away from the centre; the first vertex points up (-v).
        angle = 2 * np.pi * k / sides + np.pi / sides - np.pi / 2
        inside &= u * np.cos(angle) + v * np.sin(angle) <= apothem
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return _regular_polygon(u, v + 0.2, 3, 1.1)
    if shape == "pentagon":
        return _regular_polygon(u, v, 5, 1.0)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6, 0.95)
    if shape == "star":
        phi = np.arctan2(v, u)
        return r <= 0.4 + 0.6 * (0.5 + 0.5 * np.cos(5 * phi)) ** 2
    if shape == "diamond":
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | (
            (np.abs(v) <= 0.32) & (np.abs(u) <= 0.95)
        )
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "heart":
        x = 1.25 * u
        y = -1.25 * v + 0.25
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if shape == "ellipse":
        return u**2 + (v / 0.6) ** 2 <= 1.0
    raise ValueError(f"Unknown shape {shape!r}")


def _pattern_is_secondary(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "plain":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "stripes":
        return np.sin(3 * np.pi * u) > 0
    if pattern == "checker":
        return (np.floor(2.5 * u) + np.floor(2.5 * v)) % 2 == 0
    if pattern == "dots":
        fu = np.mod(3 * u, 1.0) - 0.5
        fv = np.mod(3 * v, 1.0) - 0.5
        return fu**2 + fv**2 < 0.09
    if pattern == "rings":
        return np.sin(4 * np.pi * np.hypot(u, v)) > 0
    if pattern == "zigzag":
        return np.sin(4 * np.pi * (v + 0.3 * np.abs(np.mod(3 * u, 2.0) - 1))) > 0
    if pattern == "grid":
        return (np.mod(3 * u, 1.0) < 0.28) | (np.mod(3 * v, 1.0) < 0.28)
    if pattern == "waves":
        return np.sin(3 * np.pi * v + 1.5 * np.sin(2 * np.pi * u)) > 0
    raise ValueError(f"Unknown pattern {pattern!r}")


@lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """Return a greyscale texture from skimage.data as float32 [H, W] in [0, 1]."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    return image.astype(np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a colour-jittered texture crop, float32 [size, size, 3] in [0, 1]."""
    texture = _texture(TEXTURES[rng.integers(len(TEXTURES))])
    height, width = texture.shape
    crop = int(rng.integers(size, min(3 * size, height, width) + 1))
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    patch = texture[top : top + crop, left : left + crop]
    patch = np.rot90(patch, k=int(rng.integers(4)))
    resized = Image.fromarray(np.ascontiguousarray(patch)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    grey = np.asarray(resized, dtype=np.float32)

    contrast = rng.uniform(0.6, 1.3)
    brightness = rng.uniform(-0.15, 0.15)
    tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
    grey = np.clip((grey - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    return grey[..., None] * tint


def _window(size: int, centre: tuple[float, float], reach: float) -> tuple[int, int, int, int]:
    """Return the pixel window ``(top, bottom, left, right)`` within ``reach`` pixels of ``centre``."""
    left = max(0, int(np.floor(centre[0] - reach)))
    right = min(size, int(np.ceil(centre[0] + reach)) + 1)
    top = max(0, int(np.floor(centre[1] - reach)))
    bottom = min(size, int(np.ceil(centre[1] + reach)) + 1)
    return top, bottom, left, right


def _object_coordinates(
    window: tuple[int, int, int, int],
    supersample: int,
    centre: tuple[float, float],
    half_size: float,
    angle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return object coordinates (u, v) of the supersampled pixel centres of a window."""
    top, bottom, left, right = window
    step = 1.0 / supersample
    xs = left + (np.arange((right - left) * supersample, dtype=np.float32) + 0.5) * step
    ys = top + (np.arange((bottom - top) * supersample, dtype=np.float32) + 0.5) * step
    x, y = np.meshgrid(xs, ys)
    dx = x - centre[0]
    dy = y - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / half_size
    v = (-sin * dx + cos * dy) / half_size
    return u, v


def _downsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks of the first two axes."""
    height, width = array.shape[:2]
    blocks = array.reshape(height // factor, factor, width // factor, factor, *array.shape[2:])
    return blocks.mean(axis=(1, 3))


def _composite(
    image: np.ndarray,
    window: tuple[int, int, int, int],
    coverage: np.ndarray,
    colour: np.ndarray,
    supersample: int,
) -> np.ndarray:
    """Alpha-composite a supersampled layer onto a window of ``image``, in place.

    ``coverage`` is bool ``[s*h, s*w]`` and ``colour`` float ``[s*h, s*w, 3]``
    for a window of ``h x w`` pixels and supersampling factor ``s``.
    """
    top, bottom, left, right = window
    alpha = _downsample(coverage.astype(np.float32), supersample)
    premultiplied = _downsample(colour * coverage[..., None], supersample)
    region = image[top:bottom, left:right]
    image[top:bottom, left:right] = region * (1.0 - alpha[..., None]) + premultiplied
    return alpha


# Largest distance from the centre, in half-sizes, that a shape or clutter
# blob can reach (the triangle's lowest vertex: 1.1 + 0.2; a blob: 0.8 + 3 * 0.2).
_OBJECT_REACH = 1.35
_CLUTTER_REACH = 1.45


def _clutter_layer(
    rng: np.random.Generator,
    image: np.ndarray,
    supersample: int,
    min_scale: float,
    max_scale: float,
) -> None:
    """Draw one irregular blob with a speckled random colour onto ``image``, in place."""
    size = image.shape[0]
    half_size = rng.uniform(0.5 * min_scale, 0.7 * max_scale) * size
    centre = (rng.uniform(0, size), rng.uniform(0, size))
    angle = rng.uniform(0, 2 * np.pi)
    window = _window(size, centre, _CLUTTER_REACH * half_size)
    u, v = _object_coordinates(window, supersample, centre, half_size, angle)
    phi = np.arctan2(v, u)
    radius = np.full(u.shape, 0.8, dtype=np.float32)
    for harmonic in range(2, 5):
        radius += rng.uniform(-0.2, 0.2) * np.cos(harmonic * phi + rng.uniform(0, 2 * np.pi))
    coverage = np.hypot(u, v) <= radius
    base = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    speckle = rng.uniform(-0.15, 0.15, size=u.shape).astype(np.float32)
    colour = np.clip(base + speckle[..., None], 0.0, 1.0)
    _composite(image, window, coverage, colour, supersample)


def render_sample(
    rng: np.random.Generator,
    label: int,
    image_size: int = 96,
    min_clutter: int = 1,
    max_clutter: int = 3,
    min_scale: float = 0.15,
    max_scale: float = 0.3,
    supersample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of class ``label``.

    Returns:
        image: uint8 ``[H, W, 3]``.
        mask: bool ``[H, W]``, the pixels at least half covered by the object.
    """
    image = _background(rng, image_size)

    # Clutter goes below the object, so that the object is never occluded and
    # its mask is the whole object.
    for _ in range(int(rng.integers(min_clutter, max_clutter + 1))):
        _clutter_layer(rng, image, supersample, min_scale, max_scale)

    spec = CLASSES[label]
    half_size = rng.uniform(min_scale, max_scale) * image_size
    margin = 0.9 * half_size
    centre = (
        rng.uniform(margin, image_size - margin),
        rng.uniform(margin, image_size - margin),
    )
    angle = rng.uniform(0, 2 * np.pi)
    window = _window(image_size, centre, _OBJECT_REACH * half_size)
    u, v = _object_coordinates(window, supersample, centre, half_size, angle)
    coverage = _shape_mask(spec.shape, u, v)
    secondary = _pattern_is_secondary(spec.pattern, u, v)

    # Colour jitter of at most 0.08 per channel and shading noise keep the
    # class colours recognisable while no two images are identical.
    primary = np.clip(np.array(spec.primary) + rng.uniform(-0.08, 0.08, 3), 0, 1)
    second = np.clip(np.array(spec.secondary) + rng.uniform(-0.08, 0.08, 3), 0, 1)
    colour = np.where(secondary[..., None], second, primary).astype(np.float32)
    shading = rng.uniform(0.85, 1.1) + rng.normal(0.0, 0.04, size=u.shape).astype(np.float32)
    colour = np.clip(colour * shading[..., None], 0.0, 1.0)
    alpha = _composite(image, window, coverage, colour, supersample)

    mask = np.zeros((image_size, image_size), dtype=bool)
    top, bottom, left, right = window
    mask[top:bottom, left:right] = alpha >= 0.5
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), mask


# ---------------------------------------------------------------------------
# Building and caching.


def benchmark_config(config: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Return the full generation config: ``DEFAULT_CONFIG`` updated by ``config`` and ``overrides``.

    Keys that do not belong to the generation config (such as ``name`` or
    ``root`` of a data config) are dropped.

    Raises:
        ValueError: if a count or range is invalid.
    """
    merged = dict(DEFAULT_CONFIG)
    for source in (config or {}, overrides):
        for key, value in dict(source).items():
            if key in DEFAULT_CONFIG:
                merged[key] = value

    _check_num_classes(int(merged["num_classes"]))
    for key in ("num_train", "num_val", "num_test"):
        if int(merged[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {merged[key]!r}")
    if int(merged["image_size"]) < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {merged['image_size']!r}")
    if not 0 <= int(merged["min_clutter"]) <= int(merged["max_clutter"]):
        raise ValueError(
            "Expected 0 <= min_clutter <= max_clutter, got "
            f"{merged['min_clutter']!r} and {merged['max_clutter']!r}"
        )
    if not 0 < float(merged["min_scale"]) <= float(merged["max_scale"]) <= 0.5:
        raise ValueError(
            "Expected 0 < min_scale <= max_scale <= 0.5, got "
            f"{merged['min_scale']!r} and {merged['max_scale']!r}"
        )
    if merged["seed"] is None:
        raise ValueError("seed must be an integer; the benchmark is always generated from a seed.")

    for key in ("image_size", "num_classes", "num_train", "num_val", "num_test", "seed",
                "min_clutter", "max_clutter"):
        merged[key] = int(merged[key])
    for key in ("min_scale", "max_scale"):
        merged[key] = float(merged[key])
    return merged


def benchmark_key(config: Mapping[str, Any]) -> str:
    """Return the 12-hex-digit cache key of a full generation config."""
    payload = json.dumps(
        {"generator_version": GENERATOR_VERSION, "textures": TEXTURES, **dict(config)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _split_size(config: Mapping[str, Any], split: str) -> int:
    return int(config[f"num_{split}"])


def _generate(directory: Path, config: Mapping[str, Any], progress: bool) -> None:
    rows = []
    total = sum(_split_size(config, split) for split in SPLITS)
    bar = tqdm(total=total, desc="Generating synthetic benchmark", disable=not progress)
    for split in SPLITS:
        count = _split_size(config, split)
        (directory / "images" / split).mkdir(parents=True)
        (directory / "masks" / split).mkdir(parents=True)

        # Balanced labels in a seeded order; each image has its own seed, so
        # any image can be regenerated on its own.
        split_seed = [config["seed"], _SPLIT_CODES[split]]
        labels = np.arange(count) % config["num_classes"]
        np.random.default_rng(split_seed).shuffle(labels)

        for index in range(count):
            rng = np.random.default_rng([*split_seed, index])
            label = int(labels[index])
            image, mask = render_sample(
                rng,
                label,
                image_size=config["image_size"],
                min_clutter=config["min_clutter"],
                max_clutter=config["max_clutter"],
                min_scale=config["min_scale"],
                max_scale=config["max_scale"],
            )
            image_file = f"images/{split}/{index:05d}.png"
            mask_file = f"masks/{split}/{index:05d}.png"
            Image.fromarray(image).save(directory / image_file)
            Image.fromarray(mask.astype(np.uint8) * 255).save(directory / mask_file)

            ys, xs = np.nonzero(mask)
            rows.append(
                {
                    "split": split,
                    "index": index,
                    "image": image_file,
                    "mask": mask_file,
                    "label": label,
                    "class_name": CLASSES[label].name,
                    "x0": int(xs.min()),
                    "y0": int(ys.min()),
                    "x1": int(xs.max()) + 1,
                    "y1": int(ys.max()) + 1,
                }
            )
            bar.update()
    bar.close()

    with open(directory / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["split"])
        writer.writeheader()
        writer.writerows(rows)
    metadata = {
        "generator_version": GENERATOR_VERSION,
        "textures": list(TEXTURES),
        "config": dict(config),
        "class_names": class_names(config["num_classes"]),
    }
    (directory / "config.json").write_text(json.dumps(metadata, indent=2) + "\n")


def build_synthetic_benchmark(
    config: Mapping[str, Any] | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Generate the benchmark unless it is cached, and return its directory.

    Args:
        config: generation settings (see ``DEFAULT_CONFIG``), for example the
            ``data`` group of the Hydra config. Its ``root`` entry is used when
            the ``root`` argument is None.
        root: folder that contains the cached benchmarks. Each config gets
            its own subfolder ``synthetic-<key>``.
        progress: show a tqdm progress bar while generating.
        **overrides: generation settings that take precedence over ``config``.

    The benchmark is built in a temporary folder next to its final place and
    then renamed, so an interrupted run never leaves a partial benchmark.

    Raises:
        ValueError: if no root is given or a setting is invalid.
    """
    if root is None and config is not None:
        root = dict(config).get("root")
    if root is None:
        raise ValueError("No root folder for the synthetic benchmark: pass `root` or set data.root.")
    full_config = benchmark_config(config, **overrides)
    root = Path(root).expanduser()
    target = root / f"synthetic-{benchmark_key(full_config)}"
    if (target / "labels.csv").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _generate(staging, full_config, progress)
        try:
            os.replace(staging, target)
        except OSError as error:
            # Another process finished the same benchmark first; keep its copy.
            if not (target / "labels.csv").is_file():
                raise OSError(
                    f"Cannot create {target}: the folder exists but has no labels.csv, so it "
                    "is not a complete benchmark. Delete it and run again."
                ) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------
# Dataset.


class SyntheticBenchmark(Dataset):
    """One split of a built synthetic benchmark as a torch ``Dataset``.

    Items are dicts:

    - ``image``: float32 ``[3, H, W]``, normalized with ImageNet mean and std.
    - ``label``: int, the class index.
    - ``box``: float32 ``[4]``, ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive.
    - ``box_valid``: bool, always True here.
    - ``mask``: bool ``[H, W]``, the object's pixels.
    - ``index``: int, the position in this split; ``path``: str, the image file.

    Args:
        root: a folder returned by ``build_synthetic_benchmark``.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        ValueError: for an unknown split.
        FileNotFoundError: if ``root`` contains no ``labels.csv``.
    """

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        self.root = Path(root).expanduser()
        labels_file = self.root / "labels.csv"
        if not labels_file.is_file():
            raise FileNotFoundError(
                f"No synthetic benchmark at {self.root}: {labels_file} is missing. Expected a "
                "folder made by build_synthetic_benchmark (labels.csv, config.json, images/, masks/)."
            )
        metadata = json.loads((self.root / "config.json").read_text())
        self.config: dict[str, Any] = metadata["config"]
        self.classes: list[str] = list(metadata["class_names"])
        self.split = split
        with open(labels_file, newline="") as handle:
            self.records = [row for row in csv.DictReader(handle) if row["split"] == split]
        self.records.sort(key=lambda row: int(row["index"]))

    @property
    def num_classes(self) -> int:
        """Number of classes of the benchmark."""
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        """Class index of every item, in item order."""
        return [int(row["label"]) for row in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.records[index]
        path = self.root / row["image"]
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        image = (image - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
        mask = np.asarray(Image.open(self.root / row["mask"])) > 127
        box = torch.tensor([float(row[key]) for key in ("x0", "y0", "x1", "y1")])
        return {
            "image": image,
            "label": int(row["label"]),
            "box": box,
            "box_valid": True,
            "mask": torch.from_numpy(mask),
            "index": int(row["index"]),
            "path": str(path),
        }
