"""ILSVRC2012 validation images with their bounding boxes.

Images are read in the layout of torchvision's ``ImageNet`` data set::

    <root>/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG
    <root>/meta.bin          optional: torchvision's (wnid_to_classes, val_wnids)

and boxes from one Pascal VOC XML file per image, as in the ILSVRC2012
validation bounding-box archive::

    <boxes_dir>/ILSVRC2012_val_XXXXXXXX.xml

Images go through torchvision's standard evaluation transform: Resize(256) of
the shorter side, CenterCrop(224), ToTensor and ImageNet normalization. A box
is mapped the same way: its coordinates are divided by the resize ratio of
their axis (original size over resized size), the crop offset is subtracted
and the result is clipped to ``[0, crop_size]``.

Class indices follow the sorted wnids, the order of torchvision's ImageNet
classes and of its pretrained weights' ``meta["categories"]``.
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from parchgrad.data.common import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Annotation",
    "BOX_MODES",
    "ImageNetValidation",
    "center_crop_offset",
    "map_box",
    "parse_annotation",
    "resized_size",
]

BOX_MODES = ("first", "union")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_LAYOUT = (
    "Expected torchvision's ImageNet layout: <root>/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG, "
    "for example <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG."
)


@dataclass(frozen=True)
class Annotation:
    """The content of one Pascal VOC XML file: image size and objects ``(name, (x0, y0, x1, y1))``."""

    path: Path
    width: int | None
    height: int | None
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...]


def parse_annotation(path: str | os.PathLike) -> Annotation:
    """Parse every ``<object>`` of a Pascal VOC XML file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not valid XML or an object lacks its name or box.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Bounding-box file {path} not found.")
    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as error:
        raise ValueError(f"Invalid XML in bounding-box file {path}: {error}") from error

    root = tree.getroot()
    width = root.findtext("size/width")
    height = root.findtext("size/height")
    objects = []
    for element in root.findall("object"):
        name = element.findtext("name")
        coordinates = [element.findtext(f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
        if name is None or None in coordinates:
            raise ValueError(
                f"An <object> in {path} lacks <name> or <bndbox> with xmin, ymin, xmax, ymax."
            )
        box = tuple(float(value) for value in coordinates)
        objects.append((name.strip(), box))
    return Annotation(
        path=path,
        width=int(width) if width else None,
        height=int(height) if height else None,
        objects=tuple(objects),
    )


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Return ``(width, height)`` after torchvision's ``Resize(size)`` of the shorter side."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offset(width: int, height: int, crop_size: int) -> tuple[int, int]:
    """Return the ``(left, top)`` offset of torchvision's ``CenterCrop(crop_size)``."""
    return int(round((width - crop_size) / 2.0)), int(round((height - crop_size) / 2.0))


def map_box(
    box: Sequence[float],
    original_size: tuple[int, int],
    resize_size: int = 256,
    crop_size: int = 224,
) -> tuple[tuple[float, float, float, float], bool]:
    """Map a box ``(x0, y0, x1, y1)`` of the original image through Resize and CenterCrop.

    Args:
        box: pixel coordinates in the original image.
        original_size: ``(width, height)`` of the original image.

    Returns:
        The box in the cropped image, clipped to ``[0, crop_size]``, and
        whether it is non-empty.
    """
    width, height = original_size
    new_width, new_height = resized_size(width, height, resize_size)
    left, top = center_crop_offset(new_width, new_height, crop_size)
    ratio_x = width / new_width
    ratio_y = height / new_height
    x0, y0, x1, y1 = (float(value) for value in box)
    mapped = (
        min(max(x0 / ratio_x - left, 0.0), crop_size),
        min(max(y0 / ratio_y - top, 0.0), crop_size),
        min(max(x1 / ratio_x - left, 0.0), crop_size),
        min(max(y1 / ratio_y - top, 0.0), crop_size),
    )
    valid = mapped[2] > mapped[0] and mapped[3] > mapped[1]
    return mapped, valid


def _union(boxes: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (
        min(box[0] for box in boxes),
        min(box[1] for box in boxes),
        max(box[2] for box in boxes),
        max(box[3] for box in boxes),
    )


def _box_mask(box: Sequence[float], size: int) -> torch.Tensor:
    """Return a bool ``[size, size]`` mask of the pixels that overlap the box."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    x0, y0, x1, y1 = box
    mask[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = True
    return mask


class ImageNetValidation(Dataset):
    """ILSVRC2012 validation images with boxes, as a torch ``Dataset``.

    Items are dicts:

    - ``image``: float32 ``[3, crop_size, crop_size]``, ImageNet-normalized.
    - ``label``: int, the index of the image's wnid among the sorted wnids.
    - ``box``: float32 ``[4]``, ``(x0, y0, x1, y1)`` in pixels of the crop.
    - ``box_valid``: bool, False when there is no usable box: it is empty
      after cropping, no object is of the image's class in ``"union"`` mode,
      or ``boxes_dir`` is None. The box is then all zeros.
    - ``mask``: bool ``[crop_size, crop_size]``, the pixels that overlap the box.
    - ``index``: int, the position in this data set; ``path``: str, the image file.

    Args:
        root: folder that contains ``val/<wnid>/``.
        boxes_dir: folder of ``<image stem>.xml`` files; None loads no boxes.
        box_mode: ``"first"``, the first object of the XML file, as in the
            authors' released code; or ``"union"``, the union of the objects
            whose name is the image's wnid.
        resize_size, crop_size: the evaluation transform's sizes.
        images_per_class: keep the first images of each class, in file-name order.
        max_images: keep at most this many images in total.
        wnids: all class wnids, in label order. None reads them from
            ``<root>/meta.bin`` when it exists, else lists the class folders.
        class_names: one name per wnid, for example the pretrained weights'
            ``meta["categories"]``. None reads them from ``meta.bin`` if present.

    Warns:
        UserWarning: when an XML file's objects are not all of the image's
            class, when a box is empty after cropping, and when the class list
            comes from the folders and does not have 1000 classes.

    Raises:
        FileNotFoundError: if ``root/val``, ``boxes_dir`` or an image's XML
            file is missing, naming the path and the expected layout.
        ValueError: for an unknown ``box_mode``, ``crop_size > resize_size``,
            a class folder that is not in ``wnids``, or a ``class_names`` list of
            the wrong length.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        boxes_dir: str | os.PathLike | None = None,
        box_mode: str = "first",
        resize_size: int = 256,
        crop_size: int = 224,
        images_per_class: int | None = None,
        max_images: int | None = None,
        wnids: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if box_mode not in BOX_MODES:
            raise ValueError(f"Unknown box_mode {box_mode!r}; expected one of {BOX_MODES}.")
        if crop_size > resize_size:
            raise ValueError(
                f"crop_size ({crop_size}) must not exceed resize_size ({resize_size})."
            )
        self.root = Path(root).expanduser()
        self.box_mode = box_mode
        self.resize_size = int(resize_size)
        self.crop_size = int(crop_size)

        val_dir = self.root / "val"
        if not val_dir.is_dir():
            raise FileNotFoundError(f"ImageNet validation folder {val_dir} not found. {_LAYOUT}")
        folders = sorted(entry.name for entry in val_dir.iterdir() if entry.is_dir())
        if not folders:
            raise FileNotFoundError(f"No class folders in {val_dir}. {_LAYOUT}")

        self.wnids, self.classes = self._class_list(folders, wnids, class_names)
        self.samples = self._list_images(val_dir, folders, images_per_class, max_images)

        self.boxes_dir = None if boxes_dir is None else Path(boxes_dir).expanduser()
        if self.boxes_dir is not None:
            self._check_boxes()

    def _class_list(
        self,
        folders: list[str],
        wnids: Sequence[str] | None,
        class_names: Sequence[str] | None,
    ) -> tuple[list[str], list[str]]:
        meta_names: dict[str, str] = {}
        meta_path = self.root / "meta.bin"
        if wnids is None and meta_path.is_file():
            wnid_to_classes, _ = torch.load(meta_path, weights_only=False)
            wnids = sorted(wnid_to_classes)
            meta_names = {wnid: _first_name(wnid_to_classes[wnid]) for wnid in wnids}
        if wnids is None:
            wnids = folders
            if len(wnids) != 1000:
                warnings.warn(
                    f"{self.root} has no meta.bin and {len(wnids)} class folders, so labels "
                    "index these folders only and do not match a 1000-class model. Add "
                    "torchvision's meta.bin or pass the full `wnids` list.",
                    stacklevel=3,
                )
        wnids = list(wnids)
        unknown = sorted(set(folders) - set(wnids))
        if unknown:
            raise ValueError(
                f"Class folders {unknown[:5]} in {self.root / 'val'} are not in the class list "
                f"of {len(wnids)} wnids. Remove them or pass the full `wnids` list."
            )

        if class_names is not None:
            if len(class_names) != len(wnids):
                raise ValueError(
                    f"class_names has {len(class_names)} entries but there are {len(wnids)} "
                    "classes; pass one name per wnid."
                )
            names = list(class_names)
        else:
            names = [meta_names.get(wnid, wnid) for wnid in wnids]
        return wnids, names

    def _list_images(
        self,
        val_dir: Path,
        folders: list[str],
        images_per_class: int | None,
        max_images: int | None,
    ) -> list[tuple[Path, int, str]]:
        label_of = {wnid: index for index, wnid in enumerate(self.wnids)}
        samples = []
        for wnid in folders:
            files = sorted(
                path for path in (val_dir / wnid).iterdir()
                if path.suffix.lower() in IMAGE_SUFFIXES
            )
            if images_per_class is not None:
                files = files[: int(images_per_class)]
            samples += [(path, label_of[wnid], wnid) for path in files]
        if max_images is not None:
            samples = samples[: int(max_images)]
        if not samples:
            raise FileNotFoundError(f"No images (.JPEG, .jpg, .png) under {val_dir}. {_LAYOUT}")
        return samples

    def _check_boxes(self) -> None:
        if not self.boxes_dir.is_dir():
            raise FileNotFoundError(
                f"Bounding-box folder {self.boxes_dir} not found. Expected one Pascal VOC file "
                "per image, <boxes_dir>/ILSVRC2012_val_XXXXXXXX.xml, as in the ILSVRC2012 "
                "validation bounding-box archive."
            )
        missing = [path for path, _, _ in self.samples if not self._xml_path(path).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images have no bounding-box file, for example "
                f"{self._xml_path(missing[0])} for {missing[0]}. Expected "
                "<boxes_dir>/<image name>.xml for every image."
            )

    def _xml_path(self, image_path: Path) -> Path:
        return self.boxes_dir / f"{image_path.stem}.xml"

    @property
    def num_classes(self) -> int:
        """Number of classes in the class list (1000 for the full ImageNet)."""
        return len(self.wnids)

    @property
    def labels(self) -> list[int]:
        """Class index of every item, in item order."""
        return [label for _, label, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _load_image(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise OSError(f"Cannot read image {path}: {error}") from error

    def _select_box(self, annotation: Annotation, wnid: str) -> tuple[float, float, float, float] | None:
        names = [name for name, _ in annotation.objects]
        if not names:
            warnings.warn(f"{annotation.path} has no <object>; the box is not used.", stacklevel=4)
            return None
        boxes = [box for name, box in annotation.objects if name == wnid]
        if any(name != wnid for name in names):
            if self.box_mode == "first":
                behaviour = "the first object is used, as in the released code"
            elif boxes:
                behaviour = "only objects of the image's class are used"
            else:
                behaviour = "none is of the image's class, so the box is not used"
            warnings.warn(
                f"{annotation.path} has objects {names} for an image of class {wnid}; {behaviour}.",
                stacklevel=4,
            )
        if self.box_mode == "first":
            return annotation.objects[0][1]
        return _union(boxes) if boxes else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label, wnid = self.samples[index]
        image = self._load_image(path)
        original_size = image.size

        image = TF.resize(image, self.resize_size)
        image = TF.center_crop(image, self.crop_size)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())

        box = (0.0, 0.0, 0.0, 0.0)
        valid = False
        if self.boxes_dir is not None:
            annotation = parse_annotation(self._xml_path(path))
            if (annotation.width, annotation.height) not in ((None, None), original_size):
                warnings.warn(
                    f"{annotation.path} gives size {annotation.width}x{annotation.height} but "
                    f"{path} is {original_size[0]}x{original_size[1]}; boxes are mapped with "
                    "the image's size.",
                    stacklevel=2,
                )
            selected = self._select_box(annotation, wnid)
            if selected is not None:
                mapped, valid = map_box(selected, original_size, self.resize_size, self.crop_size)
                if valid:
                    box = mapped
                else:
                    warnings.warn(
                        f"The box of {path} ({annotation.path}) is empty after "
                        f"Resize({self.resize_size}) and CenterCrop({self.crop_size}); it is "
                        "marked box_valid=False.",
                        stacklevel=2,
                    )

        return {
            "image": tensor,
            "label": label,
            "box": torch.tensor(box, dtype=torch.float32),
            "box_valid": valid,
            "mask": _box_mask(box, self.crop_size) if valid else torch.zeros(
                self.crop_size, self.crop_size, dtype=torch.bool
            ),
            "index": index,
            "path": str(path),
        }


def _first_name(names: Any) -> str:
    """Return the first name of a meta.bin entry (a tuple of synonyms or a string)."""
    if isinstance(names, str):
        return names
    return str(names[0])
