"""ParchGrad: saliency maps from controlled internal gradients of CNNs.

Core API:
- :class:`ParchGrad` / :func:`control`: a context manager that partitions and
  rescales the output-gradient channels of chosen convolutions.
- :mod:`parchgrad.selection`: class-wise (``cls``), instance-wise (``ins``) and
  keep-all (``all``) channel selectors.
- :func:`attribute`: Gradient, Input x Gradient, Integrated Gradients and
  SmoothGrad through Captum, with or without a controller.
- :mod:`parchgrad.layers`: the default hooked convolutions of each architecture.
"""

from .attribution import ATTRIBUTION_METHODS, attribute
from .control import ParchGrad, control, modify_output_gradient
from .layers import conv_layer_names, default_layer_names, layer_names_by_ratio, resolve_layers
from .selection import SELECTORS, AllChannelsSelector, ClassSelector, InstanceSelector, build_selector

__version__ = "0.1.0"

__all__ = [
    "ATTRIBUTION_METHODS",
    "AllChannelsSelector",
    "ClassSelector",
    "InstanceSelector",
    "ParchGrad",
    "SELECTORS",
    "attribute",
    "build_selector",
    "control",
    "conv_layer_names",
    "default_layer_names",
    "layer_names_by_ratio",
    "modify_output_gradient",
    "resolve_layers",
]
