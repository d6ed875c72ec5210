"""Claims report: every documented ParchGrad claim as a measured verdict.

Reads finished runs of E1, E2 (one per model) and the sanity checks from the
results store and writes ``claims.md`` and ``claims.json`` into the run
directory and into ``paths.figures_dir``. Each claim row carries the
experiment and config hash that test it, the measured statistic with a 95%
confidence interval, the decision rule (fixed here, before any result is
read) and the verdict: ``supported``, ``not supported`` or ``inconclusive``.

Claims, from B. Park, G. Jeon and J. Choi (2023), "ParchGrad: Controlled
Internal Gradients for Reliable Saliency Map":

- E1: many small unrelated gradients add up to a magnitude comparable to the
  few relevant ones and turn the direction of the total.
- E2 ResNet18: variance conservation (VC) puts more of the gradient inside the
  bounding boxes.
- E2 VGG16: VC has no effect, because the gradient path is sequential. It is
  checked exactly (maps with and without VC proportional image by image) and
  by the paired difference of ``mu_in_w``.
- E2 EfficientNet-B0: the effect of VC is inconclusive.
- Overall: class-wise ParchGrad localizes better than the plain method.

Run::

    python -m experiments.claims                      # latest finished runs
    python -m experiments.claims claims.e2_dirs.resnet18=results/e2_magnitude/<hash>
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from experiments.common import (
    RunContext,
    RunResult,
    absolute_path,
    find_completed_runs,
    run_experiment,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

EXPERIMENT = "claims"
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"

# Settings of E2 compared by the claims (labels written by experiments.evaluate.Setting).
PLAIN = "plain"
VC_ON = "cls_q{quantile:g}_vc_default"
VC_OFF = "cls_q{quantile:g}_novc_default"

# Differences between the code release and this project that can move results.
RELEASE_DIFFERENCES = [
    "The released class-wise statistics use the last layer's activations for every layer's "
    "t-tests; here each layer uses its own activations.",
    "The released 'Welch' test runs SciPy's Student t-test (equal variances); here Welch's "
    "test is the default and Student's is an option.",
    "The released hook uses the first sample's class for every sample of a batch; here each "
    "sample uses its own target.",
    "The released Shapiro-Wilk test runs on all 50,000 values per channel; here it runs on a "
    "uniform reservoir of at most 5,000 values, where SciPy's p-value is exact.",
    "The released Gradient seeds the backward pass with the target's softmax probability; "
    "here the logit gradient is used, which only rescales each map.",
    "The released hook also runs (and recomputes the input gradient) for the plain "
    "baseline; here the plain method runs without hooks.",
]


# ---------------------------------------------------------------------------
# Statistics and decision rules


def paired_bootstrap(
    treated: np.ndarray, control: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> dict[str, float]:
    """Return the mean of ``treated - control`` over images with a paired bootstrap CI.

    Pairs with a NaN on either side are dropped. Fewer than 3 pairs, or a
    constant difference, give the mean with a degenerate interval.
    """
    treated = np.asarray(treated, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    keep = np.isfinite(treated) & np.isfinite(control)
    difference = treated[keep] - control[keep]
    count = int(difference.size)
    if count == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    mean = float(difference.mean())
    if count < 3 or np.ptp(difference) == 0:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": count}
    result = stats.bootstrap(
        (treated[keep], control[keep]),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return {"mean": mean, "ci_low": float(interval.low), "ci_high": float(interval.high), "n": count}


def increase_verdict(interval: dict[str, float]) -> str:
    """Supported if the CI lies above 0, not supported if it lies at or below 0, else inconclusive."""
    if not np.isfinite(interval["mean"]):
        return INCONCLUSIVE
    if interval["ci_low"] > 0:
        return SUPPORTED
    if interval["ci_high"] <= 0:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def proportionality_deviation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return, per image, the largest deviation between two maps normalized to unit sum.

    ``first`` and ``second`` are ``[N, H, W]``; the deviation is
    ``max |a / sum(a) - b / sum(b)| / max(a / sum(a))``, 0 for proportional maps.
    """
    a = first.reshape(first.shape[0], -1).astype(np.float64)
    b = second.reshape(second.shape[0], -1).astype(np.float64)
    a = a / a.sum(axis=1, keepdims=True)
    b = b / b.sum(axis=1, keepdims=True)
    return np.abs(a - b).max(axis=1) / a.max(axis=1)


# ---------------------------------------------------------------------------
# Inputs


def _latest_run(results_dir: Path, experiment: str, predicate) -> Path | None:
    runs = [run for run in find_completed_runs(results_dir, experiment) if predicate(run)]
    if not runs:
        return None
    return max(runs, key=lambda run: (run / "COMPLETE").stat().st_mtime)


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def resolve_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Return the run directories of E1, E2 per model and sanity, given or the latest finished."""
    results_dir = absolute_path(cfg.paths.results_dir)
    data_name = cfg.claims.data

    def given_or_latest(path, experiment, predicate=lambda run: True):
        if path is not None:
            run = absolute_path(path)
            if not (run / "COMPLETE").exists():
                raise FileNotFoundError(
                    f"{run} is not a finished {experiment} run (no COMPLETE marker); run the "
                    "experiment first or point claims.* at a finished run in the results store."
                )
            return run
        return _latest_run(results_dir, experiment, predicate)

    e2_dirs = {}
    for model in cfg.claims.models:
        given = OmegaConf.select(cfg, f"claims.e2_dirs.{model}", default=None)
        e2_dirs[model] = given_or_latest(
            given,
            "e2_magnitude",
            lambda run, model=model: _summary(run).get("model") in _architectures(model)
            and _summary(run).get("data") == data_name,
        )
    return {
        "e1": given_or_latest(cfg.claims.e1_dir, "e1_aggregation"),
        "e2": e2_dirs,
        "sanity": given_or_latest(cfg.claims.sanity_dir, "sanity"),
    }


def _architectures(model: str) -> set[str]:
    # The VGG16 claim is tested on vgg16_bn, as in the code release.
    return {"vgg16", "vgg16_bn"} if model.startswith("vgg16") else {model}


# ---------------------------------------------------------------------------
# Claims


def _missing_row(claim_id: str, claim: str, experiment: str, rule: str) -> dict[str, Any]:
    return {
        "id": claim_id,
        "claim": claim,
        "experiment": experiment,
        "config_hash": None,
        "statistic": "not measured",
        "estimate": None,
        "ci_low": None,
        "ci_high": None,
        "n": 0,
        "rule": rule,
        "verdict": INCONCLUSIVE,
        "note": "no finished run found in the results store",
    }


def e1_claim(run_dir: Path | None, cfg: DictConfig) -> dict[str, Any]:
    """Test E1 at the figure's setting: 10 H vectors, ``claims.e1.l_count`` L vectors, scale ratio 0.1."""
    settings = cfg.claims.e1
    rule = (
        f"Normal draws, |L|={settings.l_count}, L/H scale ratio {settings.scale_ratio}: supported if the "
        f"median norm ratio |sum L|/|sum H| is at least {settings.min_norm_ratio} and the 95% CI of "
        f"the mean angle between sum H and the total lies above {settings.min_angle_degrees} degrees; "
        f"not supported if the median ratio is below {settings.min_norm_ratio / 2} or the CI lies "
        f"below {settings.min_angle_degrees / 2} degrees; otherwise inconclusive."
    )
    claim = "Many small L gradients add up to a magnitude comparable to H and turn the total's direction."
    if run_dir is None:
        return _missing_row("E1", claim, "e1_aggregation", rule)
    table = pd.read_csv(run_dir / "results.csv")
    row = table[
        (table["distribution"] == "normal")
        & (table["l_count"] == int(settings.l_count))
        & np.isclose(table["scale_ratio"], float(settings.scale_ratio))
    ]
    if row.empty:
        raise ValueError(
            f"E1 results in {run_dir} have no normal-draw row with l_count={settings.l_count} and "
            f"scale_ratio={settings.scale_ratio}; rerun E1 with these values in its sweep."
        )
    row = row.iloc[0]
    ratio = float(row["norm_ratio_median"])
    low, high = float(row["angle_ci_low"]), float(row["angle_ci_high"])
    if ratio >= settings.min_norm_ratio and low > settings.min_angle_degrees:
        verdict = SUPPORTED
    elif ratio < settings.min_norm_ratio / 2 or high < settings.min_angle_degrees / 2:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return {
        "id": "E1",
        "claim": claim,
        "experiment": "e1_aggregation",
        "config_hash": run_dir.name,
        "statistic": "mean angle between sum H and the total (degrees); median norm ratio in note",
        "estimate": float(row["angle_mean"]),
        "ci_low": low,
        "ci_high": high,
        "n": int(row.get("draws", 0)),
        "rule": rule,
        "verdict": verdict,
        "note": f"median |sum L|/|sum H| = {ratio:.3f}",
    }


def _e2_pairs(table: pd.DataFrame, treated: str, control: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pivot = table.pivot_table(index="image", columns="setting", values=metric, aggfunc="first", dropna=False)
    for setting in (treated, control):
        if setting not in pivot.columns:
            raise ValueError(
                f"E2 results have no setting {setting!r} (found {sorted(pivot.columns)}); rerun E2 "
                "with its default quantiles and variance_conservation values."
            )
    return pivot[treated].to_numpy(), pivot[control].to_numpy()


def _vc_difference(table: pd.DataFrame, cfg: DictConfig, metric: str) -> dict[str, float]:
    """Paired bootstrap of the per-image VC on minus off difference, averaged over ``claims.quantiles``."""
    treated, control = [], []
    for quantile in cfg.claims.quantiles:
        on, off = _e2_pairs(table, VC_ON.format(quantile=quantile), VC_OFF.format(quantile=quantile), metric)
        treated.append(on)
        control.append(off)
    return paired_bootstrap(
        np.mean(treated, axis=0), np.mean(control, axis=0), int(cfg.claims.resamples), int(cfg.seed)
    )


def _row(claim_id, claim, run_dir, statistic, interval, rule, verdict, note="") -> dict[str, Any]:
    return {
        "id": claim_id,
        "claim": claim,
        "experiment": "e2_magnitude",
        "config_hash": run_dir.name,
        "statistic": statistic,
        "estimate": interval["mean"],
        "ci_low": interval["ci_low"],
        "ci_high": interval["ci_high"],
        "n": interval["n"],
        "rule": rule,
        "verdict": verdict,
        "note": note,
    }


def resnet_claim(run_dir: Path | None, cfg: DictConfig) -> dict[str, Any]:
    metric = cfg.claims.metric
    claim = "ResNet18: VC puts more of the gradient inside the bounding boxes."
    rule = (
        f"Paired bootstrap 95% CI of mean({metric} with VC - without VC) over images, averaged over "
        f"quantiles {list(cfg.claims.quantiles)}: supported if the CI lies above 0, not supported if "
        "it lies at or below 0, otherwise inconclusive."
    )
    if run_dir is None:
        return _missing_row("E2-resnet18", claim, "e2_magnitude", rule)
    interval = _vc_difference(pd.read_csv(run_dir / "results.csv"), cfg, metric)
    return _row("E2-resnet18", claim, run_dir, f"{metric} difference, VC on - off", interval, rule,
                increase_verdict(interval))


def _largest_vc_deviation(run_dir: Path, cfg: DictConfig) -> float:
    """Return the largest deviation from proportionality between saved maps with and without VC."""
    deviations = []
    with np.load(run_dir / "maps.npz") as saved:
        names = [str(name) for name in saved["settings"]]
        maps = saved["maps"]
        for quantile in cfg.claims.quantiles:
            on = maps[names.index(VC_ON.format(quantile=quantile))]
            off = maps[names.index(VC_OFF.format(quantile=quantile))]
            deviations.append(proportionality_deviation(on, off))
    return float(np.max(np.concatenate(deviations)))


def _saved_image_count(run_dir: Path) -> int:
    with np.load(run_dir / "maps.npz") as saved:
        return int(saved["maps"].shape[1])


def vgg_claim(run_dir: Path | None, cfg: DictConfig) -> dict[str, Any]:
    metric = cfg.claims.metric
    tolerance = float(cfg.claims.proportionality_tolerance)
    claim = "VGG16: VC has no effect, since the gradient path is sequential."
    rule = (
        "Exact check: on every saved image and quantile, the maps with and without VC normalized to "
        f"unit sum differ by at most {tolerance:g} relative to the map's maximum (float32 maps). "
        "Supported if the check holds, not supported otherwise. The paired CI of the "
        f"{metric} difference is reported alongside."
    )
    if run_dir is None:
        return _missing_row("E2-vgg16", claim, "e2_magnitude", rule)
    interval = _vc_difference(pd.read_csv(run_dir / "results.csv"), cfg, metric)
    largest, images = _largest_vc_deviation(run_dir, cfg), _saved_image_count(run_dir)
    verdict = SUPPORTED if largest <= tolerance else NOT_SUPPORTED
    note = (
        f"largest deviation from proportionality: {largest:.2e} over {images} images x "
        f"{len(cfg.claims.quantiles)} quantiles; VGG16 here is vgg16_bn with a global-pool linear head on the "
        "synthetic benchmark (every hooked convolution is in `features`)"
    )
    return _row("E2-vgg16", claim, run_dir, f"{metric} difference, VC on - off", interval, rule, verdict, note)


def efficientnet_claim(run_dir: Path | None, cfg: DictConfig) -> dict[str, Any]:
    metric = cfg.claims.metric
    claim = "EfficientNet-B0: the effect of VC is inconclusive."
    rule = (
        f"Per quantile in {list(cfg.claims.quantiles)}, paired bootstrap 95% CI of mean({metric} with "
        "VC - without VC): supported (no clear effect) if any CI contains 0 or the CIs lie on opposite "
        "sides of 0; not supported if every CI excludes 0 on the same side (a clear effect)."
    )
    if run_dir is None:
        return _missing_row("E2-efficientnet_b0", claim, "e2_magnitude", rule)
    table = pd.read_csv(run_dir / "results.csv")
    signs = []
    for quantile in cfg.claims.quantiles:
        on, off = _e2_pairs(table, VC_ON.format(quantile=quantile), VC_OFF.format(quantile=quantile), metric)
        interval = paired_bootstrap(on, off, int(cfg.claims.resamples), int(cfg.seed))
        signs.append(0 if interval["ci_low"] <= 0 <= interval["ci_high"] else int(np.sign(interval["mean"])))
    verdict = NOT_SUPPORTED if len(set(signs)) == 1 and signs[0] != 0 else SUPPORTED
    pooled = _vc_difference(table, cfg, metric)
    note = f"per-quantile CI sides of 0: {dict(zip(map(float, cfg.claims.quantiles), signs))}"
    if (run_dir / "maps.npz").is_file():
        # When no hooked convolution is bypassed by a skip connection, VC only rescales each map.
        largest = _largest_vc_deviation(run_dir, cfg)
        note += f"; largest deviation of the VC maps from proportionality: {largest:.2e}"
    return _row("E2-efficientnet_b0", claim, run_dir, f"{metric} difference, VC on - off (pooled)",
                pooled, rule, verdict, note)


def overall_claims(e2_dirs: dict[str, Path | None], cfg: DictConfig) -> list[dict[str, Any]]:
    """Class-wise ParchGrad (VC, ``claims.overall_quantile``) against the plain method, per model and overall."""
    metric = cfg.claims.metric
    setting = VC_ON.format(quantile=cfg.claims.overall_quantile)
    claim = "Class-wise ParchGrad localizes better than the plain method."
    rule = (
        f"Paired bootstrap 95% CI of mean({metric} of {setting} - plain) over images: supported if "
        "above 0, not supported if at or below 0, otherwise inconclusive. Overall: supported if "
        "supported on every model, not supported if not supported on any model, else inconclusive."
    )
    rows = []
    for model, run_dir in e2_dirs.items():
        if run_dir is None:
            rows.append(_missing_row(f"overall-{model}", f"{claim} ({model})", "e2_magnitude", rule))
            continue
        table = pd.read_csv(run_dir / "results.csv")
        treated, control = _e2_pairs(table, setting, PLAIN, metric)
        interval = paired_bootstrap(treated, control, int(cfg.claims.resamples), int(cfg.seed))
        pointing = paired_bootstrap(*_e2_pairs(table, setting, PLAIN, "pointing_hit"),
                                    int(cfg.claims.resamples), int(cfg.seed))
        note = f"pointing-game hit-rate difference {pointing['mean']:+.3f} [{pointing['ci_low']:+.3f}, {pointing['ci_high']:+.3f}]"
        rows.append(_row(f"overall-{model}", f"{claim} ({model})", run_dir,
                         f"{metric} difference, ParchGrad - plain", interval, rule,
                         increase_verdict(interval), note))
    verdicts = [row["verdict"] for row in rows]
    if all(verdict == SUPPORTED for verdict in verdicts):
        overall = SUPPORTED
    elif any(verdict == NOT_SUPPORTED for verdict in verdicts):
        overall = NOT_SUPPORTED
    else:
        overall = INCONCLUSIVE
    rows.append({
        "id": "overall",
        "claim": claim,
        "experiment": "e2_magnitude",
        "config_hash": ", ".join(row["config_hash"] or "-" for row in rows),
        "statistic": "verdicts of the per-model rows",
        "estimate": None, "ci_low": None, "ci_high": None,
        "n": sum(row["n"] for row in rows),
        "rule": rule,
        "verdict": overall,
        "note": ", ".join(f"{row['id']}: {row['verdict']}" for row in rows),
    })
    return rows


def sanity_rows(run_dir: Path | None) -> list[dict[str, Any]]:
    """Return one row per (model, method) of the model-randomization sanity check."""
    if run_dir is None:
        return []
    summary = _summary(run_dir)
    rows = []
    for model, model_summary in summary.get("models", {}).items():
        for method, method_summary in model_summary.get("methods", {}).items():
            rows.append({
                "model": model,
                "method": method,
                "final_spearman": method_summary.get("final_spearman"),
                "final_ssim": method_summary.get("final_ssim"),
                "flagged": method_summary.get("flagged"),
            })
    return rows


# ---------------------------------------------------------------------------
# Report


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_report(claims: list[dict], sanity: list[dict], inputs: dict, cfg: DictConfig, threshold) -> str:
    """Return the Markdown report."""
    dataset = (
        "the embedded synthetic benchmark with reference models trained here"
        if cfg.claims.data == "synthetic"
        else f"{cfg.claims.data} with pretrained weights"
    )
    lines = [
        "# ParchGrad claims report",
        "",
        f"Dataset and models: {dataset}. Generated by `python -m experiments.claims` "
        "(part of `make reproduce`). Every decision rule below was fixed in "
        "`experiments/claims.py` before the results were read.",
        "",
        "| id | claim | statistic | estimate | 95% CI | n | verdict | experiment (config hash) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in claims:
        interval = f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]"
        lines.append(
            f"| {row['id']} | {row['claim']} | {row['statistic']} | {_number(row['estimate'])} | "
            f"{interval} | {row['n']} | **{row['verdict']}** | {row['experiment']} ({row['config_hash']}) |"
        )
    lines += ["", "## Decision rules and notes", ""]
    for row in claims:
        lines.append(f"- **{row['id']}**: {row['rule']}" + (f" Note: {row['note']}." if row["note"] else ""))

    lines += ["", "## Sanity check: cascading model-parameter randomization", ""]
    if sanity:
        lines += [
            "Layers are re-initialized from the logits down (Adebayo et al., 2018, \"Sanity Checks "
            "for Saliency Maps\"); the table gives the similarity between the maps of the trained "
            "model and of the fully randomized one. A method whose mean Spearman correlation stays "
            f"above {threshold} is flagged as insensitive to the model. Data randomization is not done.",
            "",
            "![sanity checks](sanity_checks.png)",
            "",
            "| model | method | final Spearman | final SSIM | flagged |",
            "|---|---|---|---|---|",
        ]
        for row in sanity:
            lines.append(
                f"| {row['model']} | {row['method']} | {_number(row['final_spearman'])} | "
                f"{_number(row['final_ssim'])} | {'yes' if row['flagged'] else 'no'} |"
            )
    else:
        lines.append("No finished sanity run was found; run `python -m experiments.sanity`.")

    lines += ["", "## Where results may differ from the code release", ""]
    lines += [f"- {item}" for item in RELEASE_DIFFERENCES]
    lines += ["", "## Inputs", ""]
    lines.append(f"- E1: `{inputs['e1']}`")
    for model, path in inputs["e2"].items():
        lines.append(f"- E2 {model}: `{path}`")
    lines.append(f"- sanity: `{inputs['sanity']}`")
    return "\n".join(lines) + "\n"


def _body(context: RunContext) -> RunResult:
    cfg = context.cfg
    inputs = resolve_inputs(cfg)
    log.info("Claims inputs (claims.*): %s", inputs)

    claims = [
        e1_claim(inputs["e1"], cfg),
        resnet_claim(inputs["e2"].get("resnet18"), cfg),
        vgg_claim(inputs["e2"].get("vgg16"), cfg),
        efficientnet_claim(inputs["e2"].get("efficientnet_b0"), cfg),
        *overall_claims(inputs["e2"], cfg),
    ]
    sanity = sanity_rows(inputs["sanity"])
    threshold = _summary(inputs["sanity"]).get("threshold") if inputs["sanity"] else None
    report = render_report(claims, sanity, inputs, cfg, threshold)
    payload = {
        "data": cfg.claims.data,
        "claims": claims,
        "sanity": sanity,
        "inputs": {key: str(value) if not isinstance(value, dict) else {k: str(v) for k, v in value.items()}
                   for key, value in inputs.items()},
        "release_differences": RELEASE_DIFFERENCES,
    }
    context.save_text("claims.md", report)
    write_json_atomic(context.output_dir / "claims.json", payload)
    for row in claims:
        log.info("Claim %s: %s (%s)", row["id"], row["verdict"], row["note"])
    return RunResult(pd.DataFrame(claims), {"verdicts": {row["id"]: row["verdict"] for row in claims}})


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write the claims report; copies of claims.md and claims.json go to ``paths.figures_dir``."""
    summary = run_experiment(cfg, EXPERIMENT, _body)
    figures_dir = absolute_path(cfg.paths.figures_dir)
    store = Path(summary["store_dir"])
    for name in ("claims.md", "claims.json"):
        write_text_atomic(figures_dir / name, (store / name).read_text())
    summary["report"] = str(figures_dir / "claims.md")
    return summary


@hydra.main(config_path="../conf", config_name="claims", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
