"""Time ParchGrad attribution against the plain method on ResNet18 at 224 px.

Cases (each ratio is measured against a reference timed in the same run):
- ParchGrad Gradient vs plain Gradient, batch 1 and batch 16: target <= 1.08x.
- ParchGrad Integrated Gradients vs plain, 26 points in one batch: target <= 1.08x.
- A hook in the released design (full backward hook, Python loop over samples,
  ``.item()`` per group, input gradient recomputed with ``conv2d_input``)
  against ours on the Gradient and IG cases: ours at least 1.1x faster.

Times are the median of interleaved repetitions after a warm-up, so a load
change on the machine affects every variant alike.

Run: ``python -m benchmarks.hooks_bench`` (or ``make bench`` for all benchmarks).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
import torchvision
from torch import nn

from parchgrad.attribution import attribute
from parchgrad.control import ParchGrad
from parchgrad.layers import default_layer_names
from parchgrad.selection import ClassSelector

from .report import print_table, save_results

NUM_CLASSES = 1000
QUANTILE = 0.1


def random_statistics(model: nn.Module, layers: list[str], seed: int = 0) -> SimpleNamespace:
    """Statistics with random p-values, shaped like those of an ImageNet model."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    channels = {name: modules[name].out_channels for name in layers}
    return SimpleNamespace(
        ttest_pvalues={n: torch.rand(NUM_CLASSES, c, generator=generator) for n, c in channels.items()},
        shapiro_pvalues={n: torch.rand(c, generator=generator) * 0.1 for n, c in channels.items()},
        mean={n: torch.rand(c, generator=generator) for n, c in channels.items()},
        std={n: torch.rand(c, generator=generator) + 0.5 for n, c in channels.items()},
    )


class ReleasedDesignHook:
    """A backward hook in the released code's design, kept here only as a timing reference.

    A full backward hook that loops over the samples in Python, reads group
    strengths with ``.item()``, and recomputes the convolution's input gradient
    from the modified output gradient with ``conv2d_input``.
    """

    def __init__(self, model: nn.Module, layers: list[str], selector: ClassSelector) -> None:
        self.modules = {name: dict(model.named_modules())[name] for name in layers}
        self.selector = selector
        self.targets: torch.Tensor | None = None
        self.handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_full_backward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()

    def _make_hook(self, name):
        def hook(module, grad_input, grad_output):
            grad = grad_output[0].clone()
            for b in range(grad.shape[0]):
                keep = self.selector(name, self.targets[b : b + 1], None)[0]
                kept_sum = grad[b, keep].sum(0)
                pruned_sum = grad[b, ~keep].sum(0)
                v_h = kept_sum.var().item() + 1e-13
                v_l = pruned_sum.var().item() + 1e-13
                if keep.all().item() or not keep.any().item():
                    continue
                beta = ((v_h + v_l) / v_h) ** 0.5
                grad[b, keep] *= beta
                grad[b, ~keep] = 0.0
            if grad_input[0] is None:
                return None
            new_input_grad = torch.nn.grad.conv2d_input(
                grad_input[0].shape, module.weight, grad, module.stride, module.padding,
                module.dilation, module.groups,
            )
            return (new_input_grad,)

        return hook


def _released_design_attribution(model, hooks, inputs, target, method):
    repeats = 26 if method == "ig" else 1
    hooks.targets = target.repeat(repeats)
    return attribute(model, inputs, target, method)


def time_call(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def measure_case(model, layers, selector, inputs, target, method, repeats):
    """Return median seconds of the plain, ParchGrad and released-design variants."""
    variants = {
        "plain": lambda: attribute(model, inputs, target, method),
    }

    def parchgrad_call():
        with ParchGrad(model, layers, selector) as parch:
            attribute(model, inputs, target, method, controller=parch)

    def released_call():
        with ReleasedDesignHook(model, layers, selector) as hooks:
            _released_design_attribution(model, hooks, inputs, target, method)

    variants["parchgrad"] = parchgrad_call
    variants["released_design"] = released_call
    for function in variants.values():
        function()  # warm-up
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            samples[name] += time_call(function, 1)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(repeats: int = 7, image_size: int = 224) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    layers = default_layer_names(model, "resnet18")
    selector = ClassSelector(random_statistics(model, layers), quantile=QUANTILE)
    rows = []
    cases = [("grad", 1), ("grad", 16), ("ig", 1)]
    for method, batch in cases:
        inputs = torch.randn(batch, 3, image_size, image_size)
        target = torch.randint(0, NUM_CLASSES, (batch,))
        medians = measure_case(model, layers, selector, inputs, target, method, repeats)
        label = f"{method} batch {batch}" + (" (26 IG points)" if method == "ig" else "")
        overhead = medians["parchgrad"] / medians["plain"]
        speedup = medians["released_design"] / medians["parchgrad"]
        rows.append(
            {
                "item": f"ParchGrad/plain time, {label}",
                "measured": round(overhead, 3),
                "target": "<= 1.08",
                "passed": overhead <= 1.08,
                "plain_s": medians["plain"],
                "parchgrad_s": medians["parchgrad"],
            }
        )
        rows.append(
            {
                "item": f"released-design hook/ours time, {label}",
                "measured": round(speedup, 3),
                "target": ">= 1.1",
                "passed": speedup >= 1.1,
                "released_design_s": medians["released_design"],
                "parchgrad_s": medians["parchgrad"],
            }
        )
    return rows


if __name__ == "__main__":
    results = run()
    print_table(results)
    save_results("hooks_bench", results)
