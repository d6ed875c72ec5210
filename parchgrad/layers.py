"""Choose the convolutions whose output gradients ParchGrad controls.

Layers are always identified by their qualified module name (as returned by
``model.named_modules()``), never by position, so that statistics files,
configs and logs stay valid when a model is rebuilt.

Default hooked sets, from Park, Jeon and Choi (2023), "ParchGrad: Controlled
Internal Gradients for Reliable Saliency Map". The authors hook only the upper
part of each network:

- ``resnet18``: ``conv1`` and ``conv2`` of every block in ``layer3`` and
  ``layer4`` (8 convolutions; the ``downsample`` convolutions are excluded).
- ``vgg16`` / ``vgg16_bn``: every Conv2d of ``features`` whose index is at
  least ``int(0.5 * len(features))``.
- ``efficientnet_b0``: the depthwise convolution ``block.1.0`` of the first
  block of ``features.6`` and of ``features.7``, and the final 1x1 convolution
  ``features.8.0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = [
    "DEFAULT_LAYER_RULES",
    "conv_layer_names",
    "default_layer_names",
    "layer_names_by_ratio",
    "resolve_layers",
]


def conv_layer_names(model: nn.Module) -> list[str]:
    """Return the qualified names of every ``nn.Conv2d`` of ``model`` in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _resnet_upper_blocks(model: nn.Module) -> list[str]:
    names = []
    for stage in ("layer3", "layer4"):
        for block_name, _ in getattr(model, stage).named_children():
            names += [f"{stage}.{block_name}.conv1", f"{stage}.{block_name}.conv2"]
    return names


def _vgg_upper_half(model: nn.Module) -> list[str]:
    start = int(0.5 * len(model.features))
    return [
        f"features.{index}"
        for index, module in enumerate(model.features)
        if index >= start and isinstance(module, nn.Conv2d)
    ]


def _efficientnet_top(model: nn.Module) -> list[str]:
    # The first MBConv block of stages 6 and 7: block[0] expands, block[1] is
    # the depthwise convolution (a Conv2dNormActivation whose [0] is the Conv2d).
    return ["features.6.0.block.1.0", "features.7.0.block.1.0", "features.8.0"]


DEFAULT_LAYER_RULES: dict[str, Callable[[nn.Module], list[str]]] = {
    "resnet18": _resnet_upper_blocks,
    "vgg16": _vgg_upper_half,
    "vgg16_bn": _vgg_upper_half,
    "efficientnet_b0": _efficientnet_top,
}


def default_layer_names(model: nn.Module, architecture: str) -> list[str]:
    """Return the paper's default hooked convolutions of ``architecture``.

    Raises:
        ValueError: if ``architecture`` has no default set, listing the model's
            Conv2d names so that the caller can pass ``layers`` explicitly.
    """
    if architecture not in DEFAULT_LAYER_RULES:
        raise ValueError(
            f"No default hooked layers for architecture {architecture!r}; known: "
            f"{sorted(DEFAULT_LAYER_RULES)}. Pass `layers` with qualified Conv2d names, "
            f"or `layer_ratio`. This model's Conv2d layers: {conv_layer_names(model)}"
        )
    names = DEFAULT_LAYER_RULES[architecture](model)
    _check_conv_names(model, names)
    return names


def layer_names_by_ratio(model: nn.Module, ratio: float) -> list[str]:
    """Return the last ``int(ratio * n)`` of the model's ``n`` Conv2d layers in module order."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"layer_ratio must be in (0, 1], got {ratio!r}")
    names = conv_layer_names(model)
    count = int(ratio * len(names))
    if count == 0:
        raise ValueError(
            f"layer_ratio={ratio} selects no layer of a model with {len(names)} Conv2d "
            "layers; use a larger ratio."
        )
    return names[len(names) - count :]


def _check_conv_names(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(
                f"Layer {name!r} not found in the model. Its Conv2d layers are: "
                f"{conv_layer_names(model)}"
            )
        if not isinstance(modules[name], nn.Conv2d):
            raise ValueError(
                f"Layer {name!r} is a {type(modules[name]).__name__}, not an nn.Conv2d. "
                f"Its Conv2d layers are: {conv_layer_names(model)}"
            )


def resolve_layers(
    model: nn.Module,
    architecture: str | None = None,
    layers: Sequence[str] | None = None,
    layer_ratio: float | None = None,
) -> list[str]:
    """Return the qualified names of the convolutions to hook.

    Exactly one source is used, in this order: an explicit ``layers`` list,
    ``layer_ratio``, the default set of ``architecture``.

    Raises:
        ValueError: if both ``layers`` and ``layer_ratio`` are given, a name is
            not a Conv2d of ``model``, or no source applies.
    """
    if layers is not None and layer_ratio is not None:
        raise ValueError("Pass either `layers` or `layer_ratio`, not both.")
    if layers is not None:
        names = list(layers)
        if not names:
            raise ValueError("`layers` is empty; name at least one Conv2d layer.")
        _check_conv_names(model, names)
        return names
    if layer_ratio is not None:
        return layer_names_by_ratio(model, layer_ratio)
    if architecture is None:
        raise ValueError(
            "Cannot choose layers: pass `architecture`, `layers` or `layer_ratio`. "
            f"This model's Conv2d layers: {conv_layer_names(model)}"
        )
    return default_layer_names(model, architecture)
