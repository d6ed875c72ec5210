"""Tests of the ImageNet validation data set on a tiny generated copy of its layout."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from parchgrad.data import build_dataset, denormalize
from parchgrad.data.imagenet import (
    ImageNetValidation,
    center_crop_offset,
    map_box,
    parse_annotation,
    resized_size,
)

TENCH, GOLDFISH, ENGLISH_SPRINGER = "n01440764", "n01443537", "n02102040"

# name: (wnid, (width, height), mode, objects as (wnid, (xmin, ymin, xmax, ymax)))
FIXTURE_IMAGES = {
    "ILSVRC2012_val_00000001": (TENCH, (500, 375), "RGB", [(TENCH, (100, 50, 300, 200))]),
    # Several objects, the first of another class.
    "ILSVRC2012_val_00000002": (
        GOLDFISH,
        (500, 375),
        "RGB",
        [
            (TENCH, (300, 200, 450, 350)),
            (GOLDFISH, (100, 100, 200, 150)),
            (GOLDFISH, (250, 120, 400, 300)),
        ],
    ),
    # A box that CenterCrop cuts off entirely.
    "ILSVRC2012_val_00000003": (TENCH, (500, 375), "RGB", [(TENCH, (0, 0, 30, 100))]),
    # A box that touches the bottom-right border of the image.
    "ILSVRC2012_val_00000004": (
        ENGLISH_SPRINGER, (500, 375), "RGB", [(ENGLISH_SPRINGER, (400, 300, 500, 375))]
    ),
    # A greyscale portrait image.
    "ILSVRC2012_val_00000005": (
        ENGLISH_SPRINGER, (300, 400), "L", [(ENGLISH_SPRINGER, (30, 100, 270, 300))]
    ),
}

# Hand-computed with Resize(256) and CenterCrop(224). For 500x375 the resized
# size is 341x256 (int(256 * 500 / 375) = 341) and the crop offset (58, 16)
# (round(117 / 2) = 58 rounds half to even); a coordinate maps as
# x * 341 / 500 - 58 and y * 256 / 375 - 16. For 300x400: 256x341, offset
# (16, 58), x * 256 / 300 - 16 and y * 341 / 400 - 58.
EXPECTED_FIRST = {
    "ILSVRC2012_val_00000001": ((10.2, 18.133333, 146.6, 120.533333), True),
    "ILSVRC2012_val_00000002": ((146.6, 120.533333, 224.0, 222.933333), True),
    "ILSVRC2012_val_00000003": ((0.0, 0.0, 0.0, 0.0), False),
    "ILSVRC2012_val_00000004": ((214.8, 188.8, 224.0, 224.0), True),
    "ILSVRC2012_val_00000005": ((9.6, 27.25, 214.4, 197.75), True),
}


def _write_xml(path, width, height, objects):
    parts = [
        "<annotation>",
        f"<filename>{path.stem}</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    path.write_text("\n".join(parts))


def _make_layout(root):
    boxes = root / "boxes"
    boxes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (wnid, (width, height), mode, objects) in FIXTURE_IMAGES.items():
        folder = root / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        channels = (height, width, 3) if mode == "RGB" else (height, width)
        pixels = rng.integers(0, 256, size=channels, dtype=np.uint8)
        Image.fromarray(pixels, mode=mode).save(folder / f"{stem}.JPEG", format="JPEG")
        _write_xml(boxes / f"{stem}.xml", width, height, objects)
    return root, boxes


@pytest.fixture(scope="module")
def imagenet_layout(tmp_path_factory):
    """Return ``(root, boxes_dir)`` of a five-image ImageNet validation layout."""
    return _make_layout(tmp_path_factory.mktemp("imagenet"))


def _index(dataset, stem):
    """Return the item index of the image named ``stem`` (items are ordered by wnid, then name)."""
    stems = [path.stem for path, _, _ in dataset.samples]
    return stems.index(stem)


def _dataset(root, boxes, **kwargs):
    with warnings.catch_warnings():
        # The fixture has 3 class folders and no meta.bin.
        warnings.simplefilter("ignore")
        return ImageNetValidation(root, boxes, **kwargs)


def test_resize_and_crop_match_torchvision():
    image = Image.new("RGB", (500, 375))
    resized = TF.resize(image, 256)
    assert resized.size == resized_size(500, 375, 256) == (341, 256)
    assert resized_size(300, 400, 256) == TF.resize(Image.new("RGB", (300, 400)), 256).size
    assert center_crop_offset(341, 256, 224) == (58, 16)
    # The crop taken at that offset equals torchvision's CenterCrop.
    pixels = torch.arange(341 * 256, dtype=torch.float32).reshape(1, 256, 341)
    assert torch.equal(TF.center_crop(pixels, 224), pixels[:, 16:240, 58:282])


def test_map_box_hand_computed():
    box, valid = map_box((100, 50, 300, 200), (500, 375))
    assert box == pytest.approx((10.2, 18.133333, 146.6, 120.533333))
    assert valid


def test_map_box_clipped_to_crop():
    box, valid = map_box((400, 300, 500, 375), (500, 375))
    assert box == pytest.approx((214.8, 188.8, 224.0, 224.0))
    assert valid


def test_map_box_cut_off_is_invalid():
    box, valid = map_box((0, 0, 30, 100), (500, 375))
    assert box[0] == box[2] == 0.0
    assert not valid


def test_parse_annotation_all_objects(imagenet_layout):
    _, boxes = imagenet_layout
    annotation = parse_annotation(boxes / "ILSVRC2012_val_00000002.xml")
    assert (annotation.width, annotation.height) == (500, 375)
    assert [name for name, _ in annotation.objects] == [TENCH, GOLDFISH, GOLDFISH]
    assert annotation.objects[2][1] == (250.0, 120.0, 400.0, 300.0)


def test_parse_annotation_invalid_xml(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="broken.xml"):
        parse_annotation(path)


@pytest.mark.parametrize("stem", sorted(EXPECTED_FIRST))
def test_first_object_boxes(imagenet_layout, stem):
    dataset = _dataset(*imagenet_layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item = dataset[_index(dataset, stem)]
    expected_box, expected_valid = EXPECTED_FIRST[stem]
    assert item["box_valid"] is expected_valid
    assert item["box"].tolist() == pytest.approx(expected_box, abs=1e-4)


def test_item_format(imagenet_layout):
    dataset = _dataset(*imagenet_layout)
    item = dataset[0]
    assert item["image"].shape == (3, 224, 224)
    assert item["image"].dtype == torch.float32
    assert item["mask"].shape == (224, 224)
    assert item["mask"].dtype == torch.bool
    assert item["index"] == 0
    assert item["path"].endswith("ILSVRC2012_val_00000001.JPEG")


def test_mask_covers_box_pixels(imagenet_layout):
    item = _dataset(*imagenet_layout)[0]
    # Box (10.2, 18.13, 146.6, 120.53): columns 10..146 and rows 18..120.
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[18:121, 10:147] = True
    assert torch.equal(item["mask"], expected)


def test_labels_follow_sorted_wnids(imagenet_layout):
    dataset = _dataset(*imagenet_layout)
    assert dataset.wnids == [TENCH, GOLDFISH, ENGLISH_SPRINGER]
    stems = [path.stem for path, _, _ in dataset.samples]
    assert stems == [
        "ILSVRC2012_val_00000001",
        "ILSVRC2012_val_00000003",
        "ILSVRC2012_val_00000002",
        "ILSVRC2012_val_00000004",
        "ILSVRC2012_val_00000005",
    ]
    assert dataset.labels == [0, 0, 1, 2, 2]


def test_greyscale_converted_to_rgb(imagenet_layout):
    dataset = _dataset(*imagenet_layout)
    item = dataset[_index(dataset, "ILSVRC2012_val_00000005")]
    assert item["image"].shape == (3, 224, 224)
    # A grey image has equal RGB values once the normalization is undone.
    rgb = denormalize(item["image"])
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5)
    assert torch.allclose(rgb[1], rgb[2], atol=1e-5)


def test_first_object_of_other_class_warns(imagenet_layout):
    dataset = _dataset(*imagenet_layout)
    with pytest.warns(UserWarning, match="ILSVRC2012_val_00000002.xml"):
        item = dataset[_index(dataset, "ILSVRC2012_val_00000002")]
    expected_box, _ = EXPECTED_FIRST["ILSVRC2012_val_00000002"]
    assert item["box"].tolist() == pytest.approx(expected_box, abs=1e-4)


def test_union_of_image_class_objects(imagenet_layout):
    dataset = _dataset(*imagenet_layout, box_mode="union")
    with pytest.warns(UserWarning, match="only objects of the image's class"):
        item = dataset[_index(dataset, "ILSVRC2012_val_00000002")]
    # Union (100, 100, 400, 300) of the two goldfish boxes.
    assert item["box"].tolist() == pytest.approx((10.2, 52.266667, 214.8, 188.8), abs=1e-4)
    assert item["box_valid"] is True


def test_union_without_image_class(tmp_path):
    root, boxes = _make_layout(tmp_path)
    _write_xml(boxes / "ILSVRC2012_val_00000001.xml", 500, 375, [(GOLDFISH, (100, 50, 300, 200))])
    dataset = _dataset(root, boxes, box_mode="union")
    with pytest.warns(UserWarning, match="ILSVRC2012_val_00000001.xml.*box is not used"):
        item = dataset[0]
    assert item["box_valid"] is False
    assert not item["mask"].any()


def test_cut_off_box_warns(imagenet_layout):
    dataset = _dataset(*imagenet_layout)
    with pytest.warns(UserWarning, match="empty after"):
        item = dataset[_index(dataset, "ILSVRC2012_val_00000003")]
    assert item["box_valid"] is False
    assert item["box"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert not item["mask"].any()


def test_without_boxes_dir(imagenet_layout):
    root, _ = imagenet_layout
    item = _dataset(root, None)[0]
    assert item["box_valid"] is False


def test_batches_collate(imagenet_layout):
    loader = torch.utils.data.DataLoader(_dataset(*imagenet_layout), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 224, 224)
    # Item order is images 1, 3, 2, 4, 5, and image 3's box is cut off.
    assert batch["box_valid"].tolist() == [True, False, True, True, True]


def test_subset_options(imagenet_layout):
    assert len(_dataset(*imagenet_layout, images_per_class=1)) == 3
    assert len(_dataset(*imagenet_layout, max_images=2)) == 2


def test_meta_bin_gives_class_list(tmp_path):
    root, boxes = _make_layout(tmp_path)
    wnid_to_classes = {
        "n00000001": ("first",),
        TENCH: ("tench", "Tinca tinca"),
        GOLDFISH: ("goldfish", "Carassius auratus"),
        ENGLISH_SPRINGER: ("English springer",),
    }
    torch.save((wnid_to_classes, []), root / "meta.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = ImageNetValidation(root, boxes, max_images=1)
    assert dataset.num_classes == 4
    assert dataset.classes == ["first", "tench", "goldfish", "English springer"]
    assert dataset.labels == [1]


def test_folder_class_list_warns(imagenet_layout):
    root, boxes = imagenet_layout
    with pytest.warns(UserWarning, match="meta.bin"):
        ImageNetValidation(root, boxes)


def test_class_names_length_checked(imagenet_layout):
    with pytest.raises(ValueError, match="class_names"):
        _dataset(*imagenet_layout, class_names=["a", "b"])


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_XXXXXXXX.JPEG") as error:
        ImageNetValidation(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "val") in str(error.value)


def test_missing_boxes_dir(imagenet_layout, tmp_path):
    root, _ = imagenet_layout
    with pytest.raises(FileNotFoundError, match="Pascal VOC") as error:
        _dataset(root, tmp_path / "no_boxes")
    assert "no_boxes" in str(error.value)


def test_missing_xml_named(tmp_path):
    root, boxes = _make_layout(tmp_path)
    (boxes / "ILSVRC2012_val_00000003.xml").unlink()
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_00000003.xml"):
        _dataset(root, boxes)


def test_unreadable_image_named(tmp_path):
    root, boxes = _make_layout(tmp_path)
    broken = root / "val" / TENCH / "ILSVRC2012_val_00000001.JPEG"
    broken.write_bytes(b"not a jpeg")
    dataset = _dataset(root, boxes)
    with pytest.raises(OSError, match="ILSVRC2012_val_00000001.JPEG"):
        dataset[0]


def test_invalid_box_mode(imagenet_layout):
    with pytest.raises(ValueError, match="box_mode"):
        _dataset(*imagenet_layout, box_mode="largest")


def test_build_dataset_imagenet(imagenet_layout):
    root, boxes = imagenet_layout
    config = {"name": "imagenet", "root": str(root), "boxes_dir": str(boxes), "box_mode": "first",
              "resize_size": 256, "crop_size": 224, "images_per_class": None, "max_images": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = build_dataset(config)
    assert isinstance(dataset, ImageNetValidation)
    assert len(dataset) == 3
