"""Tests of the claims report: decision rules, the exact VGG check and the written report."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments import claims

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_claims(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "claims",
            overrides=[
                f"paths.results_dir={tmp_path / 'results'}",
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.figures_dir={tmp_path / 'figures'}",
                "claims.resamples=2000",
                *overrides,
            ],
        )


def store_run(root, experiment, name, files, summary):
    run_dir = root / experiment / name
    run_dir.mkdir(parents=True)
    for file_name, content in files.items():
        if isinstance(content, pd.DataFrame):
            content.to_csv(run_dir / file_name, index=False)
        else:
            np.savez(run_dir / file_name, **content)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "COMPLETE").write_text("{}")
    return run_dir


def e2_table(rng, images, vc_gain, parchgrad_gain):
    """E2 rows where VC adds ``vc_gain`` and ParchGrad (VC) adds ``parchgrad_gain`` over plain."""
    rows = []
    plain = rng.uniform(1.0, 2.0, images)
    for image in range(images):
        noise = rng.normal(0, 0.01, 4)
        values = {
            "plain": plain[image],
            "cls_q0.05_novc_default": plain[image] + parchgrad_gain - vc_gain + noise[0],
            "cls_q0.05_vc_default": plain[image] + parchgrad_gain + noise[1],
            "cls_q0.1_novc_default": plain[image] + parchgrad_gain - vc_gain + noise[2],
            "cls_q0.1_vc_default": plain[image] + parchgrad_gain + noise[3],
        }
        for setting, value in values.items():
            rows.append({"image": image, "setting": setting, "mu_in_w": value, "pointing_hit": 1.0})
    return pd.DataFrame(rows)


def saved_maps(rng, images, proportional):
    base = rng.uniform(0, 1, (images, 8, 8)).astype(np.float32)
    off = base * 3.0 if proportional else base + rng.uniform(0, 1, base.shape).astype(np.float32)
    names = ["plain", "cls_q0.05_vc_default", "cls_q0.05_novc_default", "cls_q0.1_vc_default", "cls_q0.1_novc_default"]
    return {"settings": np.array(names), "maps": np.stack([base, base, off, base, off])}


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    e1 = pd.DataFrame([{
        "distribution": "normal", "l_count": 100, "scale_ratio": 0.1, "draws": 2000,
        "angle_mean": 31.0, "angle_ci_low": 30.0, "angle_ci_high": 32.0, "norm_ratio_median": 0.6,
    }])
    store_run(root, "e1_aggregation", "e1hash", {"results.csv": e1}, {})
    dirs = {
        "resnet18": store_run(root, "e2_magnitude", "resnethash",
                              {"results.csv": e2_table(rng, 40, 0.3, 0.5), "maps.npz": saved_maps(rng, 4, False)},
                              {"model": "resnet18", "data": "synthetic"}),
        "vgg16": store_run(root, "e2_magnitude", "vgghash",
                           {"results.csv": e2_table(rng, 40, 0.0, 0.5), "maps.npz": saved_maps(rng, 4, True)},
                           {"model": "vgg16_bn", "data": "synthetic"}),
        "efficientnet_b0": store_run(root, "e2_magnitude", "effhash",
                                     {"results.csv": e2_table(rng, 40, 0.0, -0.4), "maps.npz": saved_maps(rng, 4, False)},
                                     {"model": "efficientnet_b0", "data": "synthetic"}),
    }
    sanity_summary = {"threshold": 0.5, "models": {"resnet18": {"methods": {
        "plain": {"final_spearman": 0.1, "final_ssim": 0.05, "flagged": False},
        "parchgrad": {"final_spearman": 0.7, "final_ssim": 0.4, "flagged": True},
    }}}}
    store_run(root, "sanity", "sanityhash", {"results.csv": pd.DataFrame({"x": [1]})}, sanity_summary)
    return dirs


def test_paired_bootstrap_detects_shift():
    rng = np.random.default_rng(1)
    control = rng.normal(0, 1, 200)
    shifted = claims.paired_bootstrap(control + 0.5 + rng.normal(0, 0.1, 200), control, 2000, 0)
    assert shifted["ci_low"] > 0.4
    assert shifted["ci_high"] < 0.6
    assert claims.increase_verdict(shifted) == claims.SUPPORTED
    same = claims.paired_bootstrap(control + rng.normal(0, 0.1, 200), control, 2000, 0)
    assert claims.increase_verdict(same) == claims.INCONCLUSIVE
    worse = claims.paired_bootstrap(control - 0.5, control, 2000, 0)
    assert claims.increase_verdict(worse) == claims.NOT_SUPPORTED


def test_paired_bootstrap_drops_nan_pairs():
    result = claims.paired_bootstrap(np.array([1.0, np.nan, 3.0, 4.0]), np.array([0.0, 1.0, np.nan, 2.0]), 100, 0)
    assert result["n"] == 2
    assert result["mean"] == pytest.approx(1.5)


def test_proportionality_deviation():
    maps = np.random.default_rng(2).uniform(0, 1, (3, 5, 5))
    assert np.all(claims.proportionality_deviation(maps, 7.0 * maps) < 1e-12)
    changed = maps.copy()
    changed[1, 0, 0] += 1.0
    deviation = claims.proportionality_deviation(maps, changed)
    assert deviation[1] > 0.05
    assert deviation[0] < 1e-12


def test_report_verdicts(tmp_path, store):
    cfg = compose_claims(tmp_path)
    summary = claims.run(cfg)
    verdicts = summary["verdicts"]
    assert verdicts["E1"] == claims.SUPPORTED
    assert verdicts["E2-resnet18"] == claims.SUPPORTED
    assert verdicts["E2-vgg16"] == claims.SUPPORTED
    # No VC effect in the EfficientNet fixture, so "the effect is inconclusive" holds.
    assert verdicts["E2-efficientnet_b0"] == claims.SUPPORTED
    assert verdicts["overall-resnet18"] == claims.SUPPORTED
    assert verdicts["overall-efficientnet_b0"] == claims.NOT_SUPPORTED
    assert verdicts["overall"] == claims.NOT_SUPPORTED

    report = (tmp_path / "figures" / "claims.md").read_text()
    assert "embedded synthetic benchmark" in report
    assert "Where results may differ from the code release" in report
    assert "| resnet18 | parchgrad | 0.7 | 0.4 | yes |" in report
    payload = json.loads((tmp_path / "figures" / "claims.json").read_text())
    assert {row["id"] for row in payload["claims"]} >= {"E1", "E2-resnet18", "E2-vgg16", "E2-efficientnet_b0", "overall"}
    for row in payload["claims"]:
        assert row["verdict"] in (claims.SUPPORTED, claims.NOT_SUPPORTED, claims.INCONCLUSIVE)
        assert row["rule"]


def test_efficientnet_clear_vc_effect_not_supported(tmp_path, store):
    cfg = compose_claims(tmp_path)
    # The ResNet fixture has a clear VC gain on both quantiles.
    row = claims.efficientnet_claim(store["resnet18"], cfg)
    assert row["verdict"] == claims.NOT_SUPPORTED


def test_vgg_non_proportional_maps_not_supported(tmp_path, store):
    cfg = compose_claims(tmp_path)
    row = claims.vgg_claim(store["resnet18"], cfg)
    assert row["verdict"] == claims.NOT_SUPPORTED
    assert "largest deviation" in row["note"]


def test_missing_runs_are_inconclusive(tmp_path):
    cfg = compose_claims(tmp_path)
    summary = claims.run(cfg)
    assert set(summary["verdicts"].values()) == {claims.INCONCLUSIVE}


def test_given_unfinished_run_rejected(tmp_path):
    (tmp_path / "partial").mkdir()
    cfg = compose_claims(tmp_path, f"claims.e1_dir={tmp_path / 'partial'}")
    with pytest.raises(FileNotFoundError, match="not a finished e1_aggregation run"):
        claims.run(cfg)
