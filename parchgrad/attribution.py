"""Input attribution through Captum's gradient methods, with or without ParchGrad.

Four methods with the settings of the ParchGrad code release (v23.11.07.1);
each returns an ``[B, H, W]`` map from the input gradient of the target class:

- ``grad``: Captum ``Saliency``; ``|grad|``, mean over colour channels.
- ``inputgrad``: Captum ``InputXGradient``; ``|x * grad|``, mean over colour channels.
- ``ig``: Captum ``IntegratedGradients`` with a zero baseline, 26 points
  ``i / 25`` and the trapezoid rule (``riemann_trapezoid``). The signed
  attribution is averaged over colour channels, then made absolute.
- ``smoothgrad``: Captum ``NoiseTunnel`` over ``Saliency`` with 25 noisy
  copies, noise standard deviation ``0.15 * (max(x) - min(x))`` of each image,
  mean of ``|grad|``, mean over colour channels.

When a :class:`~parchgrad.control.ParchGrad` controller is given, the method
runs on ``controller.model`` with the targets passed as an additional forward
argument, so Captum expands them together with the inputs and every hooked
convolution knows the class explained by each row.

NOTE: the released code seeds the backward pass with the softmax probability
of the target, which scales each sample's map by a constant. Here the
gradient of the target logit is used; normalized maps and every metric of
:mod:`parchgrad.metrics` are unchanged by a per-sample scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import Tensor, nn

from .control import ParchGrad

__all__ = ["ATTRIBUTION_METHODS", "AttributionMethod", "attribute", "map_kind"]

IG_POINTS = 26  # points i / 25, i = 0..25, as released
SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_NOISE = 0.15  # fraction of each image's value range (max - min)


@dataclass(frozen=True)
class AttributionMethod:
    """A registered attribution method.

    ``compute(forward, inputs, target, forward_args, **options)`` returns the
    ``[B, 3, H, W]`` attribution before reduction: signed for ``grad``,
    ``inputgrad`` and ``ig``, already ``|grad|`` averaged over noise for
    ``smoothgrad``. ``absolute_before_mean`` is True when the map is
    ``mean_c |a_c|`` and False when it is ``|mean_c a_c|`` (Integrated Gradients).
    """

    name: str
    compute: Callable[[nn.Module, Tensor, Tensor, tuple], Tensor]
    absolute_before_mean: bool


def _saliency(forward: nn.Module, inputs: Tensor, target: Tensor, forward_args: tuple, **options) -> Tensor:
    return Saliency(forward).attribute(
        inputs, target=target, abs=False, additional_forward_args=forward_args
    )


def _input_x_gradient(forward, inputs, target, forward_args, **options) -> Tensor:
    return InputXGradient(forward).attribute(
        inputs, target=target, additional_forward_args=forward_args
    )


def _integrated_gradients(forward, inputs, target, forward_args, *, n_steps=IG_POINTS,
                          internal_batch_size=None, **options) -> Tensor:
    return IntegratedGradients(forward).attribute(
        inputs,
        baselines=torch.zeros_like(inputs),
        target=target,
        additional_forward_args=forward_args,
        n_steps=n_steps,
        method="riemann_trapezoid",
        internal_batch_size=internal_batch_size,
    )


def _smoothgrad(forward, inputs, target, forward_args, *, nt_samples=SMOOTHGRAD_SAMPLES,
                noise_level=SMOOTHGRAD_NOISE, nt_samples_batch_size=None, **options) -> Tensor:
    # Captum takes one noise std per input tensor, so each image gets its own call
    # to use its own value range. The loop is outside the backward pass.
    tunnel = NoiseTunnel(Saliency(forward))
    maps = []
    for row in range(inputs.shape[0]):
        image = inputs[row : row + 1]
        value_range = float(image.detach().max() - image.detach().min())
        row_args = tuple(arg[row : row + 1] for arg in forward_args)
        maps.append(
            tunnel.attribute(
                image,
                nt_type="smoothgrad",
                nt_samples=nt_samples,
                nt_samples_batch_size=nt_samples_batch_size,
                stdevs=noise_level * value_range,
                target=target[row : row + 1],
                additional_forward_args=row_args if row_args else None,
                abs=True,
            )
        )
    return torch.cat(maps)


ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {
    "grad": AttributionMethod("grad", _saliency, absolute_before_mean=True),
    "inputgrad": AttributionMethod("inputgrad", _input_x_gradient, absolute_before_mean=True),
    "ig": AttributionMethod("ig", _integrated_gradients, absolute_before_mean=False),
    "smoothgrad": AttributionMethod("smoothgrad", _smoothgrad, absolute_before_mean=True),
}


def map_kind(method: str, signed: bool = False) -> str:
    """Return the kind of map that ``attribute(..., method, signed=signed)`` returns.

    ``"absolute"`` is the non-negative ``[B, H, W]`` map, ``"signed"`` the
    ``[B, 3, H, W]`` attribution before any absolute value. Results record it
    next to their scores, because the metrics of :mod:`parchgrad.metrics` read
    ``|map|`` and so give the same scores to a signed map and its absolute value.

    Raises:
        ValueError: for a method not in :data:`ATTRIBUTION_METHODS`.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {sorted(ATTRIBUTION_METHODS)}.")
    return "signed" if signed else "absolute"


def _format_target(target: Tensor | int | list[int], batch: int, device: torch.device) -> Tensor:
    target = torch.as_tensor(target, dtype=torch.long, device=device)
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a [B={batch}] tensor, got shape {tuple(target.shape)}")
    return target.contiguous()


def attribute(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | list[int],
    method: str = "grad",
    controller: ParchGrad | None = None,
    *,
    signed: bool = False,
    **options: object,
) -> Tensor:
    """Compute attribution maps for ``target``, with ParchGrad when ``controller`` is given.

    Args:
        model: the classifier, in eval mode; it is also ``controller.network``
            when a controller is given.
        inputs: ``[B, 3, H, W]`` normalized images.
        target: the explained class, an int or ``[B]``; targets may differ within a batch.
        method: a name in :data:`ATTRIBUTION_METHODS`.
        controller: an active :class:`ParchGrad` context manager, or None for the plain method.
        signed: return the signed ``[B, 3, H, W]`` attribution before any
            absolute value or channel mean (for checks such as IG completeness).
        options: method settings, e.g. ``n_steps`` or ``internal_batch_size`` for
            ``ig``, ``nt_samples`` or ``noise_level`` for ``smoothgrad``.

    Returns:
        ``[B, H, W]`` non-negative maps (``signed=False``), or the signed
        ``[B, 3, H, W]`` attribution.

    Raises:
        ValueError: for an unknown method, a malformed target or input, or a
            controller that belongs to another model.
        RuntimeError: if the model is in training mode.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {sorted(ATTRIBUTION_METHODS)}.")
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    if model.training:
        raise RuntimeError(
            "The model is in training mode, so attribution would update BatchNorm running "
            "statistics and use dropout. Call model.eval() first."
        )
    target = _format_target(target, inputs.shape[0], inputs.device)

    if controller is None:
        forward, forward_args = model, ()
    else:
        if controller.network is not model:
            raise ValueError("The controller was built for another model; pass the model it controls.")
        if not controller.active:
            raise ValueError("The controller is not active; use it as `with controller:` around attribute().")
        forward, forward_args = controller.model, (target,)

    spec = ATTRIBUTION_METHODS[method]
    inputs = inputs.detach().requires_grad_()
    attribution = spec.compute(forward, inputs, target, forward_args, **options)
    # Captum keeps Input x Gradient and IG attached to the graph; the maps are results, not inputs.
    attribution = attribution.detach()
    if signed:
        return attribution
    if spec.absolute_before_mean:
        return attribution.abs().mean(dim=1)
    return attribution.mean(dim=1).abs()
