"""Model-parameter randomization checks for saliency maps.

Adebayo et al. (2018), "Sanity Checks for Saliency Maps" (NeurIPS): if an
explanation method depends on what the model learned, its maps must change
when the learned parameters are replaced by random ones. The cascading test
re-initializes the layers from the top (logits) down, cumulatively, and after
each step compares the maps of the randomized model with the original maps.
A method whose maps stay similar after the whole model is randomized fails
the check (:func:`flag_insensitive`).

Choices made here:

- Units: Conv2d, Linear and BatchNorm2d modules (any module that owns
  parameters is randomized when a step names it or a module above it).
  ``granularity="layer"`` randomizes one such module per step;
  ``granularity="block"`` randomizes one block per step and
  ``granularity="stage"`` one top-level child (see :func:`randomization_steps`);
  ``order`` gives the steps explicitly.
- Re-initialization: each module gets the initialization that PyTorch gives a
  new module of its type (``reset_parameters``), drawn from a generator
  seeded with ``(seed, step)``. Conv and Linear weights and biases are drawn
  from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. BatchNorm2d gets weight 1 and
  bias 0, and its running mean and variance are reset to 0 and 1 unless
  ``keep_batchnorm_statistics=True``. The running statistics are estimated
  from the trained model's activations, so keeping them keeps some of what
  was learned from data.
- Similarity, per image, between the original and the randomized map:
  Spearman rank correlation of the absolute maps (``scipy.stats.spearmanr``)
  and SSIM (``skimage.metrics.structural_similarity``) of the absolute maps,
  each min-max normalized to [0, 1], with ``data_range=1``. A constant map has
  no ranks, so its Spearman correlation is NaN; means skip NaN values.
- The original maps are computed on an untouched deep copy, so the caller's
  model is never modified. Captum's gradient methods call
  ``torch.autograd.grad``, so no parameter ``.grad`` is written either.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attribution import attribute
from .control import ParchGrad
from .layers import resolve_layers

__all__ = [
    "GRANULARITIES",
    "METRICS",
    "RANDOMIZED_TYPES",
    "Explainer",
    "cascading_randomization",
    "flag_insensitive",
    "independent_randomization",
    "long_format",
    "make_explainer",
    "map_similarity",
    "randomizable_layers",
    "randomization_steps",
    "randomize_modules",
]

Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]

RANDOMIZED_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
GRANULARITIES = ("layer", "block", "stage")
METRICS = ("spearman", "ssim")
ORIGINAL_STEP_LABEL = "original"


# ---------------------------------------------------------------------------
# Steps: which modules each randomization step re-initializes


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomizable_layers(model: nn.Module) -> list[str]:
    """Return the qualified names of the Conv2d, Linear and BatchNorm2d modules of ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, RANDOMIZED_TYPES)]


def _block_units(model: nn.Module, expand_sequential: bool = True) -> list[list[str]]:
    """Split ``model`` into blocks in module order, each a list of qualified module names.

    The blocks are the top-level children that hold parameters. With
    ``expand_sequential``, a child that is an ``nn.Sequential`` is replaced by
    its own children (ResNet ``layer4.0``, VGG ``features.40``, EfficientNet
    ``features.8``). A block made only of
    BatchNorm2d modules joins the block before it, so that a convolution and its
    normalization are randomized together (ResNet ``conv1`` and ``bn1``, VGG
    ``features.0`` and ``features.1``).
    """
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if expand_sequential and isinstance(child, nn.Sequential):
            units += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            units.append((name, child))

    blocks: list[list[str]] = []
    for name, module in units:
        if not _has_parameters(module):
            continue
        only_batchnorm = all(
            isinstance(sub, nn.BatchNorm2d) for sub in module.modules() if _owns_parameters(sub)
        )
        if only_batchnorm and blocks:
            blocks[-1].append(name)
        else:
            blocks.append([name])
    if _owns_parameters(model):
        # Parameters registered on the root module itself form a block of their own.
        blocks.append([""])
    return blocks


def randomization_steps(
    model: nn.Module,
    granularity: str = "layer",
    order: Sequence[str | Sequence[str]] | None = None,
) -> list[tuple[str, list[str]]]:
    """Return the randomization steps of ``model``, from the top (logits) down.

    Each step is ``(label, module_names)``: the qualified names of the modules
    that the step re-initializes, with every module that owns parameters below
    them. ``label`` joins the names with ``+``.

    Args:
        model: the network.
        granularity: ``"layer"`` randomizes one Conv2d, Linear or BatchNorm2d
            per step, in reverse module order. ``"block"`` randomizes one block
            per step (see :func:`_block_units`); for ResNet18 the steps are
            ``fc``, ``layer4.1``, ``layer4.0``, ..., ``layer1.0``, ``conv1+bn1``.
            ``"stage"`` randomizes one top-level child per step; for ResNet18
            the steps are ``fc``, ``layer4``, ..., ``layer1``, ``conv1+bn1``,
            and for VGG ``classifier`` and ``features``.
        order: explicit steps in the order they are applied (first entry
            randomized first); an entry is a qualified module name or a list of
            names randomized together. Overrides ``granularity``.

    Raises:
        ValueError: for an unknown granularity, an unknown or parameter-free
            module name, or a model without parameters.
    """
    modules = dict(model.named_modules())
    if order is not None:
        steps = []
        for entry in order:
            names = [entry] if isinstance(entry, str) else [str(name) for name in entry]
            if not names:
                raise ValueError("An entry of `order` is an empty list; name at least one module.")
            for name in names:
                if name not in modules:
                    raise ValueError(
                        f"Module {name!r} in `order` not found in the model. Randomizable layers: "
                        f"{randomizable_layers(model)}"
                    )
                if not _has_parameters(modules[name]):
                    raise ValueError(f"Module {name!r} in `order` has no parameters, so randomizing it changes nothing.")
            steps.append(("+".join(names), names))
        if not steps:
            raise ValueError("`order` is empty; name at least one module, or pass order=None.")
        return steps

    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; choose one of {GRANULARITIES}.")
    if granularity == "layer":
        units = [[name] for name in randomizable_layers(model)]
    else:
        units = _block_units(model, expand_sequential=granularity == "block")
    if not units:
        raise ValueError(
            f"The model has no {'/'.join(t.__name__ for t in RANDOMIZED_TYPES)} modules to randomize; "
            "pass `order` with module names."
        )
    return [("+".join(names) or "<root>", names) for names in reversed(units)]


# ---------------------------------------------------------------------------
# Re-initialization


def _draw_uniform(parameter: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    values = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
    values.uniform_(-bound, bound, generator=generator)
    return values


def _reset_module(module: nn.Module, generator: torch.Generator, keep_batchnorm_statistics: bool) -> None:
    """Give ``module``'s own parameters the initialization of a new module of its type."""
    with torch.no_grad():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            # PyTorch's reset_parameters: kaiming_uniform_(a=sqrt(5)) for the weight,
            # which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            module.weight.copy_(_draw_uniform(module.weight, bound, generator))
            if module.bias is not None:
                module.bias.copy_(_draw_uniform(module.bias, bound, generator))
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            if keep_batchnorm_statistics:
                if module.affine:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            else:
                module.reset_parameters()
        elif hasattr(module, "reset_parameters"):
            # Other types draw from the global generator, so fork it and seed it
            # from ours to stay reproducible without changing the caller's state.
            devices = sorted({p.device.index for p in module.parameters(recurse=False) if p.is_cuda})
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                module.reset_parameters()
        else:
            raise TypeError(
                f"Cannot re-initialize a {type(module).__name__}: it owns parameters but has no "
                "reset_parameters(). Leave it out of `order`."
            )


def randomize_modules(
    model: nn.Module,
    names: Sequence[str],
    *,
    seed: int = 0,
    keep_batchnorm_statistics: bool = False,
) -> list[str]:
    """Re-initialize, in place, the modules ``names`` of ``model`` and every module below them that owns parameters.

    The values are drawn from a CPU generator seeded with ``seed``, so they do
    not depend on the model's device or on the global random state. Returns the
    qualified names of the re-initialized modules.

    Raises:
        ValueError: if a name is not a module of ``model``.
        TypeError: if a module owns parameters but has no known initialization.
    """
    generator = torch.Generator().manual_seed(int(seed))
    modules = dict(model.named_modules())
    done: list[str] = []
    for name in names:
        if name not in modules:
            raise ValueError(f"Module {name!r} not found in the model; randomizable layers: {randomizable_layers(model)}")
        for sub_name, sub in modules[name].named_modules(prefix=name):
            if sub_name in done or not _owns_parameters(sub):
                continue
            _reset_module(sub, generator, keep_batchnorm_statistics)
            done.append(sub_name)
    return done


def _step_seed(seed: int, step: int) -> int:
    """Return a 63-bit seed for ``step`` derived from ``seed`` (NumPy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------
# Similarity of two sets of maps


def _min_max(image: np.ndarray) -> np.ndarray:
    """Scale ``image`` to [0, 1]; a constant image becomes all zeros."""
    low, high = float(image.min()), float(image.max())
    if not high > low:
        return np.zeros_like(image)
    return (image - low) / (high - low)


def _ssim_window(height: int, width: int) -> int:
    """Return skimage's default window side 7, or the largest odd side that fits a smaller map."""
    side = min(height, width, 7)
    if side % 2 == 0:
        side -= 1
    if side < 3:
        raise ValueError(f"SSIM needs maps of at least 3 x 3 pixels, got {height} x {width}.")
    return side


def map_similarity(original: Tensor | np.ndarray, other: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Compare two batches of saliency maps image by image.

    Args:
        original, other: ``[B, H, W]`` maps; their absolute values are compared.

    Returns:
        ``{"spearman": [B], "ssim": [B]}`` float64 arrays. ``spearman`` is the
        Spearman rank correlation of the flattened absolute maps, NaN when
        either map is constant. ``ssim`` is the SSIM of the absolute maps after
        min-max normalization to [0, 1], with ``data_range=1``.
    """
    first = np.abs(_as_numpy(original))
    second = np.abs(_as_numpy(other))
    if first.ndim != 3 or first.shape != second.shape:
        raise ValueError(
            f"Expected two [B, H, W] map batches of the same shape, got {first.shape} and {second.shape}."
        )
    window = _ssim_window(first.shape[1], first.shape[2])
    spearman = np.empty(first.shape[0])
    ssim = np.empty(first.shape[0])
    for index, (a, b) in enumerate(zip(first, second)):
        with warnings.catch_warnings():
            # A constant map has no ranks; NaN records it and the warning adds nothing.
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            spearman[index] = stats.spearmanr(a.ravel(), b.ravel()).statistic
        ssim[index] = structural_similarity(_min_max(a), _min_max(b), data_range=1.0, win_size=window)
    return {"spearman": spearman, "ssim": ssim}


def _as_numpy(maps: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(maps, Tensor):
        return maps.detach().to("cpu", torch.float64).numpy()
    return np.asarray(maps, dtype=np.float64)


# ---------------------------------------------------------------------------
# Explainers


def make_explainer(
    method: str = "grad",
    selector: object | None = None,
    layers: Sequence[str] | None = None,
    *,
    architecture: str | None = None,
    layer_ratio: float | None = None,
    attribution_options: Mapping[str, Any] | None = None,
    **parchgrad_options: Any,
) -> Explainer:
    """Build an ``explain(model, inputs, target) -> [B, H, W]`` function for the randomization checks.

    Without ``selector`` the function runs the plain attribution ``method``
    (see :func:`parchgrad.attribution.attribute`). With a ``selector`` it runs
    ``method`` under a :class:`~parchgrad.control.ParchGrad` controller that it
    builds on the model it receives, which during a check is the randomized
    copy: the hooked layers are looked up by qualified name, and those names
    are the same in the copy.

    The selector is not rebuilt. A :class:`~parchgrad.selection.ClassSelector`
    keeps the channel masks computed from the statistics of the original,
    trained model; they are not recollected after randomization. This is
    deliberate: the check tests whether the maps depend on the parameters, and
    the maps still change because the gradients flowing through the kept
    channels change. An :class:`~parchgrad.selection.InstanceSelector` reads
    the randomized model's activations but compares them with the original
    model's dataset mean and standard deviation.

    NOTE: ParchGrad adds ``eps`` (1e-13 by default) to the group strengths.
    Randomized layers above a hooked convolution can shrink its output
    gradient until the strengths are far below ``eps``. The VC factor then
    tends to the constant ``sqrt(2)`` instead of following the gradients.
    Pass a smaller ``eps`` in ``parchgrad_options`` when that matters.

    Args:
        method: a name in :data:`parchgrad.attribution.ATTRIBUTION_METHODS`.
        selector: a channel selector, or None for the plain method.
        layers, architecture, layer_ratio: the hooked convolutions, resolved by
            :func:`parchgrad.layers.resolve_layers` on each model explained.
        attribution_options: keyword arguments of ``attribute`` (e.g. ``n_steps``).
        parchgrad_options: keyword arguments of ``ParchGrad``
            (``variance_conservation``, ``gamma``, ``exact_variance``, ``eps``).

    Raises:
        ValueError: if layer or ParchGrad options are given without a selector.
    """
    from .attribution import ATTRIBUTION_METHODS

    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {sorted(ATTRIBUTION_METHODS)}.")
    options = dict(attribution_options or {})
    if selector is None:
        unused = [key for key, value in (("layers", layers), ("architecture", architecture),
                                        ("layer_ratio", layer_ratio)) if value is not None]
        unused += sorted(parchgrad_options)
        if unused:
            raise ValueError(
                f"{unused} configure ParchGrad, but no selector was given; pass `selector` "
                "or drop these options for the plain method."
            )

        def explain_plain(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
            return attribute(model, inputs, target, method, **options)

        return explain_plain

    def explain_parchgrad(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        hooked = resolve_layers(model, architecture=architecture, layers=layers, layer_ratio=layer_ratio)
        with ParchGrad(model, hooked, selector, **parchgrad_options) as controller:
            return attribute(model, inputs, target, method, controller, **options)

    return explain_parchgrad


def _explain_checked(explain: Explainer, model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    maps = explain(model, inputs, target)
    expected = (inputs.shape[0], inputs.shape[2], inputs.shape[3])
    if not isinstance(maps, Tensor) or tuple(maps.shape) != expected:
        shape = tuple(maps.shape) if hasattr(maps, "shape") else type(maps).__name__
        raise ValueError(f"explain must return a [B, H, W] = {list(expected)} tensor, got {shape}.")
    return maps.detach()


# ---------------------------------------------------------------------------
# Randomization sweeps


def _format_target(target: Tensor | int | Sequence[int], inputs: Tensor) -> Tensor:
    target = torch.as_tensor(target, dtype=torch.long, device=inputs.device)
    if target.dim() == 0:
        target = target.expand(inputs.shape[0])
    if tuple(target.shape) != (inputs.shape[0],):
        raise ValueError(f"target must be an int or a [B={inputs.shape[0]}] tensor, got shape {tuple(target.shape)}")
    return target


def _similarity_rows(step: int, label: str, modules: list[str], similarity: Mapping[str, np.ndarray]) -> list[dict]:
    rows = []
    for metric in METRICS:
        values = similarity[metric]
        finite = values[np.isfinite(values)]
        rows.append(
            {
                "step": step,
                "layer": label,
                "modules": list(modules),
                "metric": metric,
                "mean": float(finite.mean()) if finite.size else math.nan,
                "valid": int(finite.size),
                "values": [float(value) for value in values],
            }
        )
    return rows


def _randomization_sweep(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | Sequence[int],
    explain: Explainer,
    *,
    cumulative: bool,
    order: Sequence[str | Sequence[str]] | None,
    granularity: str,
    seed: int,
    keep_batchnorm_statistics: bool,
    progress: bool,
    return_maps: bool,
) -> list[dict] | tuple[list[dict], Tensor]:
    if model.training:
        raise RuntimeError(
            "The model is in training mode, so explaining it would update BatchNorm running "
            "statistics. Call model.eval() first."
        )
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be [B, C, H, W], got shape {tuple(inputs.shape)}")
    target = _format_target(target, inputs)
    steps = randomization_steps(model, granularity=granularity, order=order)

    # Step 0 explains an untouched copy, so the caller's model is never used.
    working = copy.deepcopy(model)
    original = _explain_checked(explain, working, inputs, target)
    rows = _similarity_rows(0, ORIGINAL_STEP_LABEL, [], map_similarity(original, original))
    all_maps = [original.cpu()] if return_maps else []

    description = "cascading randomization" if cumulative else "independent randomization"
    for step, (label, names) in enumerate(tqdm(steps, desc=description, disable=not progress), start=1):
        if not cumulative:
            working = copy.deepcopy(model)
        randomized = randomize_modules(
            working, names, seed=_step_seed(seed, step), keep_batchnorm_statistics=keep_batchnorm_statistics
        )
        maps = _explain_checked(explain, working, inputs, target)
        rows += _similarity_rows(step, label, randomized, map_similarity(original, maps))
        if return_maps:
            all_maps.append(maps.cpu())

    if return_maps:
        return rows, torch.stack(all_maps)
    return rows


def cascading_randomization(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | Sequence[int],
    explain: Explainer,
    order: Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    granularity: str = "layer",
    keep_batchnorm_statistics: bool = False,
    return_maps: bool = False,
) -> list[dict] | tuple[list[dict], Tensor]:
    """Randomize ``model`` cumulatively from the top down and compare the maps after each step.

    Works on a deep copy: ``model`` itself is neither modified nor explained.
    Step 0 explains the unmodified copy. Step ``k`` re-initializes the modules
    of the ``k``-th entry of :func:`randomization_steps`, keeping the
    randomization of steps ``1..k-1``, and explains the copy again.

    Args:
        model: the trained classifier, in eval mode.
        inputs: ``[B, 3, H, W]`` images, on the model's device.
        target: ``[B]`` classes to explain (or one int for all); kept fixed at
            every step, not replaced by the randomized model's predictions.
        explain: ``explain(model, inputs, target) -> [B, H, W]``, e.g. from
            :func:`make_explainer`.
        order: explicit steps, see :func:`randomization_steps`; None uses ``granularity``.
        seed: seeds the re-initialization; step ``k`` uses a generator derived
            from ``(seed, k)``.
        progress: show a tqdm progress bar over the steps.
        granularity: ``"layer"`` or ``"block"``, see :func:`randomization_steps`.
        keep_batchnorm_statistics: keep BatchNorm running mean and variance
            (weight and bias are still reset).
        return_maps: also return the maps of every step.

    Returns:
        A list of rows, two per step (one per metric), step 0 first. Each row
        has ``step`` (int), ``layer`` (the step's label, ``"original"`` for step
        0), ``modules`` (qualified names re-initialized at this step),
        ``metric`` (``"spearman"`` or ``"ssim"``), ``mean`` (over images, NaN
        skipped), ``valid`` (number of finite values) and ``values`` (one per
        image). With ``return_maps``, a tuple of the rows and the maps
        ``[steps + 1, B, H, W]`` on the CPU.

    Raises:
        RuntimeError: if the model is in training mode.
        ValueError: for malformed inputs or target, an invalid ``order`` or
            ``granularity``, or an ``explain`` that does not return ``[B, H, W]``.
    """
    return _randomization_sweep(
        model, inputs, target, explain,
        cumulative=True, order=order, granularity=granularity, seed=seed,
        keep_batchnorm_statistics=keep_batchnorm_statistics, progress=progress, return_maps=return_maps,
    )


def independent_randomization(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | Sequence[int],
    explain: Explainer,
    order: Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    granularity: str = "layer",
    keep_batchnorm_statistics: bool = False,
    return_maps: bool = False,
) -> list[dict] | tuple[list[dict], Tensor]:
    """Randomize one step's modules at a time, each on a fresh copy of ``model``, and compare the maps.

    The independent variant of Adebayo et al. (2018): every other layer keeps
    its trained parameters. Arguments and rows are those of
    :func:`cascading_randomization`.
    """
    return _randomization_sweep(
        model, inputs, target, explain,
        cumulative=False, order=order, granularity=granularity, seed=seed,
        keep_batchnorm_statistics=keep_batchnorm_statistics, progress=progress, return_maps=return_maps,
    )


def flag_insensitive(
    results: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]],
    threshold: float = 0.5,
    metric: str = "spearman",
) -> bool | dict[str, bool]:
    """Flag a method whose maps stay similar after the whole model is randomized.

    A method fails the check (True) when the mean ``metric`` of the last step
    of its cascading randomization is above ``threshold``. The last step is
    the fully randomized model when the steps cover every layer, as the
    ``granularity`` steps do. With an ``order`` that names only part of the
    model, it is the last step run. A NaN mean (every randomized map constant) is not flagged, since the
    maps did change.

    Args:
        results: the rows of :func:`cascading_randomization`, or a mapping from
            method name to such rows.
        threshold: similarity above which the method is flagged.
        metric: ``"spearman"`` or ``"ssim"``.

    Returns:
        A bool, or a ``{method: bool}`` dict for a mapping.

    Raises:
        ValueError: if ``metric`` is unknown or the rows have no randomized step.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS}.")
    if isinstance(results, Mapping):
        return {name: flag_insensitive(rows, threshold, metric) for name, rows in results.items()}
    rows = [row for row in results if row["metric"] == metric and row["step"] > 0]
    if not rows:
        raise ValueError(f"The results have no randomized step with metric {metric!r}; run a randomization first.")
    last = max(rows, key=lambda row: row["step"])
    return bool(last["mean"] > threshold)


def long_format(results: Sequence[Mapping[str, Any]], **columns: Any) -> list[dict[str, Any]]:
    """Return one row per image: ``columns`` plus ``step``, ``layer``, ``metric``, ``image`` and ``value``."""
    return [
        {**columns, "step": row["step"], "layer": row["layer"], "metric": row["metric"],
         "image": image, "value": value}
        for row in results
        for image, value in enumerate(row["values"])
    ]
