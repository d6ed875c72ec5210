"""ParchGrad's backward modification of convolution output gradients.

For each hooked ``nn.Conv2d`` and each sample, the output-gradient channels are
split into a kept group H and a pruned group L by a selector. With
``S_H = sum_{c in H} g_c`` and ``S_L = sum_{c in L} g_c`` (``[h, w]`` maps) and
the group strengths ``V_H = Var_spatial(S_H) + eps`` and
``V_L = Var_spatial(S_L) + eps`` (``|S_H|`` and ``|S_L|`` when ``h = w = 1``):

- gamma-infinity (``gamma=None``): ``g_H <- beta * g_H`` and ``g_L <- 0``, with
  ``beta = sqrt((V_H + V_L) / V_H)`` under variance conservation (VC), else 1.
- finite ``gamma``: ``gamma_hat = gamma * sqrt(V_L / V_H)``; with VC
  ``beta = sqrt((V_H + V_L) / (V_H * gamma_hat**2 + V_L))``, else 1; then
  ``g_H <- gamma_hat * beta * g_H`` and ``g_L <- beta * g_L``.
- exact variance (finite ``gamma`` only): ``g_H <- gamma_hat * g_H``, then the
  whole ``g`` is scaled so that the strength of ``sum_c g_c`` equals its value
  before the change.
- A sample whose H or L is empty is left unchanged.

The modified gradient replaces the convolution's output gradient through a
tensor hook, so autograd computes the input gradient once, with the layer's own
weight, stride, padding, dilation and groups.

Reference: B. Park, G. Jeon and J. Choi (2023), "ParchGrad: Controlled Internal
Gradients for Reliable Saliency Map".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["EPSILON", "ChannelSelector", "ParchGrad", "control", "modify_output_gradient"]

EPSILON = 1e-13


class ChannelSelector(Protocol):
    """Chooses the kept channels H of one layer for a batch.

    ``needs_activation`` is True when the controller must record the layer's
    per-channel GAP of ``ReLU(conv output)`` for the current input.
    """

    needs_activation: bool

    def __call__(self, layer: str, targets: Tensor, activation: Tensor | None) -> Tensor | None:
        """Return the kept-channel mask ``[B, C]`` (bool) of ``layer``, or None to keep all.

        ``targets`` is ``[B]`` (long), the explained class of each sample;
        ``activation`` is ``[B, C]``, the GAP of ``ReLU(conv output)``, or None
        when ``needs_activation`` is False.
        """
        ...


def _group_strength(summed: Tensor) -> Tensor:
    """Return the spatial variance of ``summed`` ``[B, h, w]`` as ``[B]``, or ``|summed|`` for 1x1 maps."""
    flat = summed.flatten(1)
    if flat.shape[1] == 1:
        return flat[:, 0].abs()
    return flat.var(dim=1)


def modify_output_gradient(
    grad: Tensor,
    keep: Tensor,
    *,
    variance_conservation: bool = True,
    gamma: float | None = None,
    exact_variance: bool = False,
    eps: float = EPSILON,
) -> Tensor:
    """Return ParchGrad's modified output gradient of one convolution.

    Args:
        grad: ``[B, C, h, w]``, the gradient arriving at the convolution's output.
        keep: ``[B, C]`` bool, True for the channels of the kept group H of each sample.
        variance_conservation: rescale so that the layer's gradient keeps its
            strength ``V_H + V_L`` (VC); False gives plain "zero pruning".
        gamma: None for gamma-infinity mode, else the finite gamma (> 0).
        exact_variance: with a finite ``gamma``, restore the exact strength of the
            channel-summed gradient instead of the independence approximation.
        eps: added to both group strengths.

    Returns:
        ``[B, C, h, w]``, the modified gradient (a new tensor). Samples whose H or
        L is empty are returned unchanged.

    The computation is vectorized over samples and channels and never leaves
    the device: one channel-sum, two strengths and one broadcast multiply.
    """
    if grad.dim() != 4:
        raise ValueError(f"grad must be [B, C, h, w], got shape {tuple(grad.shape)}")
    if keep.shape != grad.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(
            f"keep must be a bool tensor of shape {tuple(grad.shape[:2])}, "
            f"got {keep.dtype} of shape {tuple(keep.shape)}"
        )
    if gamma is None and exact_variance:
        raise ValueError("exact_variance requires a finite gamma; set gamma or exact_variance=False.")
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma!r}")

    # Channel-summed maps of H and of L, [B, h, w].
    keep_weight = keep.to(grad.dtype)
    summed_kept = torch.einsum("bchw,bc->bhw", grad, keep_weight)
    summed_all = grad.sum(dim=1)
    summed_pruned = summed_all - summed_kept
    strength_kept = _group_strength(summed_kept) + eps
    strength_pruned = _group_strength(summed_pruned) + eps

    # Per-sample factors for H and L, [B].
    if gamma is None:
        if variance_conservation:
            scale_kept = torch.sqrt((strength_kept + strength_pruned) / strength_kept)
        else:
            scale_kept = torch.ones_like(strength_kept)
        scale_pruned = torch.zeros_like(strength_kept)
    else:
        gamma_hat = gamma * torch.sqrt(strength_pruned / strength_kept)
        if exact_variance:
            # Strength of the summed map after scaling H alone, then one common factor.
            modified_sum = gamma_hat[:, None, None] * summed_kept + summed_pruned
            common = torch.sqrt(
                (_group_strength(summed_all) + eps) / (_group_strength(modified_sum) + eps)
            )
            scale_kept = gamma_hat * common
            scale_pruned = common
        else:
            if variance_conservation:
                beta = torch.sqrt(
                    (strength_kept + strength_pruned)
                    / (strength_kept * gamma_hat**2 + strength_pruned)
                )
            else:
                beta = torch.ones_like(strength_kept)
            scale_kept = gamma_hat * beta
            scale_pruned = beta

    # An empty H or L leaves the sample unchanged.
    kept_count = keep.sum(dim=1)
    partitioned = (kept_count > 0) & (kept_count < keep.shape[1])
    one = torch.ones_like(scale_kept)
    scale_kept = torch.where(partitioned, scale_kept, one)
    scale_pruned = torch.where(partitioned, scale_pruned, one)

    # [B, C] channel factors, broadcast over space.
    channel_scale = scale_pruned[:, None] + (scale_kept - scale_pruned)[:, None] * keep_weight
    return grad * channel_scale[:, :, None, None]


class ParchGrad:
    """Context manager that applies ParchGrad to the chosen convolutions of a model.

    While active, a forward hook on each layer in ``layers`` attaches a tensor
    hook to the convolution's output. In the backward pass that hook calls
    ``selector`` for the kept channels of the batch and returns
    :func:`modify_output_gradient`'s result. Every handle is removed on exit,
    including when an exception is raised inside the block or the backward pass.
    The model's modules and flags (``inplace``, train/eval mode) are not changed:
    tensor hooks see the gradient of the convolution output even when an in-place
    ReLU overwrites that output afterwards.

    Targets: call :meth:`set_targets` with the ``[B]`` explained classes before
    the forward pass, or run the model through :attr:`model`, a wrapper whose
    forward takes ``(inputs, targets)`` so that Captum expands the targets along
    with the inputs (Integrated Gradients, NoiseTunnel).

    Args:
        model: the network; it must be in eval mode so that BatchNorm statistics
            are not updated by attribution.
        layers: qualified names of the ``nn.Conv2d`` modules to control.
        selector: a :class:`ChannelSelector`.
        variance_conservation, gamma, exact_variance, eps: see
            :func:`modify_output_gradient`.

    Example::

        with ParchGrad(model, ["layer4.1.conv2"], selector) as parch:
            maps = Saliency(parch.model).attribute(x, target=y, additional_forward_args=(y,))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        selector: ChannelSelector,
        *,
        variance_conservation: bool = True,
        gamma: float | None = None,
        exact_variance: bool = False,
        eps: float = EPSILON,
    ) -> None:
        if gamma is None and exact_variance:
            raise ValueError("exact_variance requires a finite gamma; set gamma or exact_variance=False.")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        modules = dict(model.named_modules())
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("`layers` is empty; name at least one Conv2d layer.")
        for name in self.layers:
            if not isinstance(modules.get(name), nn.Conv2d):
                found = "not found" if name not in modules else f"a {type(modules[name]).__name__}"
                conv_names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
                raise ValueError(
                    f"Layer {name!r} is {found}, expected an nn.Conv2d of the model. "
                    f"Conv2d layers: {conv_names}"
                )
        self.network = model
        self.selector = selector
        self.variance_conservation = variance_conservation
        self.gamma = gamma
        self.exact_variance = exact_variance
        self.eps = eps
        self.model = _TargetedModel(model, self)
        self._modules = {name: modules[name] for name in self.layers}
        self._handles: list[RemovableHandle] = []
        self._targets: Tensor | None = None
        self._activations: dict[str, Tensor] = {}

    @property
    def active(self) -> bool:
        """True while the hooks are installed (inside the ``with`` block)."""
        return bool(self._handles)

    def set_targets(self, targets: Tensor | int | Sequence[int]) -> None:
        """Set the explained class of each sample of the next forward pass (``[B]`` or a scalar)."""
        self._targets = torch.as_tensor(targets, dtype=torch.long)

    def __enter__(self) -> ParchGrad:
        if self._handles:
            raise RuntimeError("This ParchGrad controller is already active; it cannot be nested.")
        if self.network.training:
            raise RuntimeError(
                "The model is in training mode, so attribution would update BatchNorm "
                "running statistics. Call model.eval() before using ParchGrad."
            )
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activations.clear()
        self._targets = None

    def _make_forward_hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not output.requires_grad:
                # Nothing flows back through this output, so there is nothing to modify.
                return
            activation = None
            if self.selector.needs_activation:
                # Keep only the [B, C] GAP of ReLU(conv output), not the whole map.
                activation = torch.relu(output.detach()).mean(dim=(2, 3))
            targets = self._targets
            output.register_hook(self._make_gradient_hook(name, targets, activation))

        return forward_hook

    def _make_gradient_hook(self, name: str, targets: Tensor | None, activation: Tensor | None):
        def gradient_hook(grad: Tensor) -> Tensor:
            if targets is None:
                raise RuntimeError(
                    "ParchGrad has no targets for this batch. Call set_targets(targets) "
                    "before the forward pass, or run the model through `controller.model`."
                )
            batch_targets = targets.to(grad.device)
            if batch_targets.dim() == 0:
                batch_targets = batch_targets.expand(grad.shape[0])
            if batch_targets.shape[0] != grad.shape[0]:
                raise RuntimeError(
                    f"ParchGrad got {batch_targets.shape[0]} targets for a batch of "
                    f"{grad.shape[0]} samples at layer {name!r}."
                )
            keep = self.selector(name, batch_targets, activation)
            if keep is None:
                return grad
            if keep.shape != grad.shape[:2]:
                raise ValueError(
                    f"The selector returned a mask of shape {tuple(keep.shape)} for layer {name!r}, "
                    f"whose output gradient has {grad.shape[1]} channels for {grad.shape[0]} samples. "
                    "Were the statistics collected for another model? Collect them for this one."
                )
            return modify_output_gradient(
                grad,
                keep,
                variance_conservation=self.variance_conservation,
                gamma=self.gamma,
                exact_variance=self.exact_variance,
                eps=self.eps,
            )

        return gradient_hook


class _TargetedModel(nn.Module):
    """Forward wrapper whose second argument is the ``[B]`` target of each row.

    Captum expands ``additional_forward_args`` exactly as it expands the inputs
    (Integrated Gradients repeats them per step, NoiseTunnel per noise sample),
    so the targets reach the hooks row by row.
    """

    def __init__(self, model: nn.Module, controller: ParchGrad) -> None:
        super().__init__()
        # Stored outside the module tree so the wrapper adds no parameters or hooks.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_controller", controller)

    def forward(self, inputs: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is not None:
            self._controller.set_targets(targets)
        return self._model(inputs)


def control(
    model: nn.Module,
    layers: Sequence[str],
    selector: ChannelSelector,
    **options: object,
) -> ParchGrad:
    """Return a :class:`ParchGrad` context manager; ``options`` are its keyword arguments."""
    return ParchGrad(model, layers, selector, **options)
