"""Data sets: the embedded synthetic benchmark and the ImageNet validation path.

Both return items in one format (see ``SyntheticBenchmark``): an
ImageNet-normalized ``image`` ``[3, H, W]``, ``label``, ``box``
``(x0, y0, x1, y1)``, ``box_valid``, ``mask`` ``[H, W]``, ``index`` and ``path``.
"""

from parchgrad.data.common import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from parchgrad.data.synthetic import SyntheticBenchmark, build_synthetic_benchmark

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SyntheticBenchmark",
    "build_synthetic_benchmark",
    "denormalize",
    "normalize",
]
