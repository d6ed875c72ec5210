"""Data sets: the embedded synthetic benchmark and the ImageNet validation path.

Both return items in one format: an ImageNet-normalized ``image``
``[3, H, W]``, ``label``, ``box`` ``(x0, y0, x1, y1)`` in pixels with ``x1``
and ``y1`` exclusive, ``box_valid``, ``mask`` ``[H, W]``, ``index`` and ``path``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from parchgrad.data.common import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from parchgrad.data.imagenet import ImageNetValidation
from parchgrad.data.synthetic import SyntheticBenchmark, build_synthetic_benchmark

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetValidation",
    "SyntheticBenchmark",
    "build_dataset",
    "build_synthetic_benchmark",
    "denormalize",
    "normalize",
]


def build_dataset(
    data_config: Mapping[str, Any],
    split: str = "test",
    class_names: list[str] | None = None,
    progress: bool = True,
) -> Dataset:
    """Return the data set that a Hydra ``data`` config describes.

    Args:
        data_config: the ``data`` group, with ``name`` ``"synthetic"`` or
            ``"imagenet"``; relative paths should already be absolute.
        split: ``"train"``, ``"val"`` or ``"test"`` of the synthetic benchmark,
            which is built first when it is not cached. ImageNet has only its
            validation set, so the split is ignored there.
        class_names: ImageNet class names in wnid order, for example the
            pretrained weights' ``meta["categories"]``.

    Raises:
        ValueError: for an unknown data set name.
    """
    name = data_config.get("name")
    if name == "synthetic":
        root = build_synthetic_benchmark(data_config, progress=progress)
        return SyntheticBenchmark(root, split)
    if name == "imagenet":
        return ImageNetValidation(
            data_config["root"],
            boxes_dir=data_config.get("boxes_dir"),
            box_mode=data_config.get("box_mode", "first"),
            resize_size=int(data_config.get("resize_size", 256)),
            crop_size=int(data_config.get("crop_size", 224)),
            images_per_class=data_config.get("images_per_class"),
            max_images=data_config.get("max_images"),
            class_names=class_names,
        )
    raise ValueError(f"Unknown data set {name!r}; expected data.name 'synthetic' or 'imagenet'.")
