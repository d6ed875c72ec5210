"""Constants and helpers shared by the data sets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "normalize"]

# Per-channel RGB mean and standard deviation of ImageNet, the values that
# torchvision's pretrained classifiers expect.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def normalize(images: Tensor) -> Tensor:
    """Map RGB values in [0, 1] (``[..., 3, H, W]``) to ImageNet-normalized values."""
    mean = IMAGENET_MEAN.to(images.device, images.dtype)[:, None, None]
    std = IMAGENET_STD.to(images.device, images.dtype)[:, None, None]
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Map ImageNet-normalized images (``[..., 3, H, W]``) back to RGB values in [0, 1]."""
    mean = IMAGENET_MEAN.to(images.device, images.dtype)[:, None, None]
    std = IMAGENET_STD.to(images.device, images.dtype)[:, None, None]
    return images * std + mean
