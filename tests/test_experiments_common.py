"""Tests of the run life cycle shared by the Hydra experiments (experiments/common.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from experiments import common


@pytest.fixture(autouse=True)
def clear_hydra_config():
    """Leave no Hydra runtime config behind, since HydraConfig is a process-wide singleton."""
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = None


def set_hydra_runtime(output_dir: Path, cwd: Path) -> None:
    """Install a Hydra runtime config as a Hydra entry point would, with the ``hydra:`` resolver."""
    setup_globals()
    hydra_node = OmegaConf.structured(HydraConf)
    hydra_node.runtime.output_dir = str(output_dir)
    hydra_node.runtime.cwd = str(cwd)
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_node}))


def make_cfg(tmp_path: Path, output: str = "out", value: int = 1, seed: int | None = 0):
    return OmegaConf.create(
        {
            "experiment": "unit",
            "seed": seed,
            "value": value,
            "progress": False,
            "paths": {
                "output_dir": str(tmp_path / output),
                "results_dir": str(tmp_path / "results"),
            },
        }
    )


def table_body(calls: list | None = None, sleep: float = 0.0):
    def body(context: common.RunContext) -> common.RunResult:
        if calls is not None:
            calls.append(context.output_dir)
        if sleep:
            time.sleep(sleep)
        value = int(context.cfg.value)
        table = pd.DataFrame({"image": [0, 1, 2], "score": [value, value + 1, value + 2]})
        return common.RunResult(table=table, summary={"value": value, "pid": os.getpid()})

    return body


def failing_body(context: common.RunContext) -> common.RunResult:
    raise RuntimeError("interrupted on purpose")


# ---------------------------------------------------------------------------
# Hashing, seeding, paths


def test_config_hash_ignores_output_locations(tmp_path):
    first = make_cfg(tmp_path, output="a")
    second = make_cfg(tmp_path, output="b")
    second.paths.results_dir = str(tmp_path / "elsewhere")
    second.progress = True
    assert common.config_hash(first) == common.config_hash(second)


def test_config_hash_changes_with_settings(tmp_path):
    assert common.config_hash(make_cfg(tmp_path, value=1)) != common.config_hash(make_cfg(tmp_path, value=2))
    assert common.config_hash(make_cfg(tmp_path, seed=0)) != common.config_hash(make_cfg(tmp_path, seed=1))


def test_config_hash_ignores_hydra_runtime_interpolations(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.paths.log_file = "${hydra:runtime.output_dir}/run.log"
    set_hydra_runtime(str(tmp_path / "x"), str(tmp_path))
    first = common.config_hash(cfg)
    set_hydra_runtime(str(tmp_path / "y"), str(tmp_path))
    assert common.config_hash(cfg) == first
    assert "log_file" not in common.hashed_config(cfg)["paths"]


def test_seed_zero_is_a_seed():
    common.seed_everything(0)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    common.seed_everything(0)
    second = (random.random(), np.random.rand(), torch.rand(1).item())
    assert first == second


def test_seed_rejects_non_integer():
    with pytest.raises(TypeError, match="seed"):
        common.seed_everything("0")


def test_relative_paths_resolve_against_launch_directory(tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    elsewhere = tmp_path / "elsewhere"
    launch.mkdir()
    elsewhere.mkdir()
    set_hydra_runtime(str(elsewhere), str(launch))
    # Hydra's working directory differs from the launch directory (hydra.job.chdir=true).
    monkeypatch.chdir(elsewhere)
    cfg = OmegaConf.create(
        {
            "data": {"root": "data/synthetic", "name": "synthetic"},
            "paths": {"cache_dir": ".cache", "results_dir": str(tmp_path / "abs")},
            "note": "relative/but/not/a/path/key",
        }
    )
    common.resolve_path_keys(cfg)
    assert cfg.data.root == str(launch / "data" / "synthetic")
    assert cfg.paths.cache_dir == str(launch / ".cache")
    assert cfg.paths.results_dir == str(tmp_path / "abs")
    assert cfg.note == "relative/but/not/a/path/key"
    assert cfg.data.name == "synthetic"


def test_relative_paths_without_hydra_use_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.absolute_path("a/b") == tmp_path / "a" / "b"


# ---------------------------------------------------------------------------
# Atomic writes and summaries


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    common.write_json_atomic(tmp_path / "s.json", {"a": float("nan"), "b": np.float32(1.5), "c": torch.tensor([1, 2])})
    common.write_csv_atomic(tmp_path / "r.csv", pd.DataFrame({"x": [1, 2]}))
    common.save_npz_atomic(tmp_path / "m.npz", {"maps": torch.ones(2, 3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "r.csv", "s.json"]
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": 1.5, "c": [1, 2]}
    assert np.load(tmp_path / "m.npz")["maps"].shape == (2, 3)


def test_mean_confidence_interval_values():
    interval = common.mean_confidence_interval([1.0, 2.0, 3.0, float("nan")])
    # t(0.975, 2) = 4.3027, sem = 1 / sqrt(3)
    assert interval["n"] == 3
    assert interval["mean"] == pytest.approx(2.0)
    assert interval["ci_high"] - 2.0 == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    single = common.mean_confidence_interval([5.0])
    assert single["mean"] == 5.0
    assert np.isnan(single["ci_low"])
    assert common.mean_confidence_interval([])["n"] == 0


def test_summarize_table_keeps_missing_groups():
    table = pd.DataFrame(
        {"method": ["plain", "plain", "pg", "pg"], "quantile": [np.nan, np.nan, 0.1, 0.1], "score": [1.0, 3.0, 2.0, 4.0]}
    )
    summary = common.summarize_table(table, ["method", "quantile"], ["score"])
    assert len(summary) == 2
    assert summary.loc[summary.method == "plain", "score_mean"].item() == 2.0
    text = common.markdown_table(summary, ["method", "quantile"], ["score"])
    assert text.splitlines()[0] == "| method | quantile | score |"
    assert len(text.splitlines()) == 4


# ---------------------------------------------------------------------------
# Run life cycle


def test_run_writes_outputs_and_store(tmp_path):
    cfg = make_cfg(tmp_path)
    summary = common.run_experiment(cfg, "unit", table_body())
    output_dir = Path(summary["output_dir"])
    store_dir = Path(summary["store_dir"])

    assert summary["skipped"] is False
    assert output_dir == tmp_path / "out"
    assert store_dir == tmp_path / "results" / "unit" / common.config_hash(cfg)
    for directory in (output_dir, store_dir):
        assert (directory / "config.yaml").is_file()
        assert (directory / "summary.json").is_file()
        assert pd.read_csv(directory / "results.csv")["score"].tolist() == [1, 2, 3]
    assert OmegaConf.load(output_dir / "config.yaml").value == 1
    assert (store_dir / common.COMPLETE_MARKER).is_file()
    assert not (store_dir / common.LOCK_FILE).exists()
    assert json.loads((store_dir / "summary.json").read_text())["value"] == 1


def test_second_run_of_same_config_is_skipped(tmp_path):
    calls: list = []
    common.run_experiment(make_cfg(tmp_path, output="first"), "unit", table_body(calls))
    summary = common.run_experiment(make_cfg(tmp_path, output="second"), "unit", table_body(calls))
    assert len(calls) == 1
    assert summary["skipped"] is True
    assert summary["value"] == 1
    assert not (tmp_path / "second" / "results.csv").exists()


def test_interrupted_run_reruns(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        common.run_experiment(cfg, "unit", failing_body)
    store_dir = tmp_path / "results" / "unit" / common.config_hash(cfg)
    assert not (store_dir / common.COMPLETE_MARKER).exists()
    assert not (store_dir / common.LOCK_FILE).exists()

    calls: list = []
    summary = common.run_experiment(make_cfg(tmp_path, output="retry"), "unit", table_body(calls))
    assert len(calls) == 1
    assert summary["skipped"] is False
    assert (store_dir / common.COMPLETE_MARKER).is_file()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    cfg = make_cfg(tmp_path)
    store_dir = tmp_path / "results" / "unit" / common.config_hash(cfg)
    store_dir.mkdir(parents=True)
    # A process that has exited: its pid is free (or reused, which this test tolerates poorly,
    # so take the pid of a child that has just been reaped).
    child = multiprocessing.get_context("fork").Process(target=lambda: None)
    child.start()
    child.join()
    (store_dir / common.LOCK_FILE).write_text(
        json.dumps({"pid": child.pid, "host": __import__("socket").gethostname(), "started": 0})
    )
    summary = common.run_experiment(cfg, "unit", table_body())
    assert summary["skipped"] is False
    assert (store_dir / common.COMPLETE_MARKER).is_file()


def test_live_lock_raises(tmp_path):
    cfg = make_cfg(tmp_path)
    store_dir = tmp_path / "results" / "unit" / common.config_hash(cfg)
    store_dir.mkdir(parents=True)
    (store_dir / common.LOCK_FILE).write_text(
        json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": 0})
    )
    with pytest.raises(RuntimeError, match="is taken by another run"):
        common.run_experiment(cfg, "unit", table_body())


def test_same_output_dir_twice_gets_unique_dir(tmp_path):
    first = common.run_experiment(make_cfg(tmp_path, output="fixed", value=1), "unit", table_body())
    second = common.run_experiment(make_cfg(tmp_path, output="fixed", value=2), "unit", table_body())
    first_dir, second_dir = Path(first["output_dir"]), Path(second["output_dir"])
    assert first_dir == tmp_path / "fixed"
    assert second_dir.parent == first_dir
    assert pd.read_csv(first_dir / "results.csv")["score"].tolist() == [1, 2, 3]
    assert pd.read_csv(second_dir / "results.csv")["score"].tolist() == [2, 3, 4]


def _run_in_child(tmp_path: str, value: int, queue) -> None:
    try:
        summary = common.run_experiment(make_cfg(Path(tmp_path), output="shared", value=value), "unit", table_body(sleep=0.5))
        queue.put(("ok", summary["output_dir"], summary["skipped"]))
    except RuntimeError as error:
        queue.put(("error", str(error), None))


def _run_concurrently(tmp_path: Path, values: list[int]) -> list[tuple]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_run_in_child, args=(str(tmp_path), value, queue)) for value in values]
    for child in children:
        child.start()
    outcomes = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    return outcomes


def test_concurrent_runs_in_same_dir_do_not_collide(tmp_path):
    outcomes = _run_concurrently(tmp_path, [1, 2])
    assert [status for status, _, _ in outcomes] == ["ok", "ok"]
    directories = {Path(directory) for _, directory, _ in outcomes}
    assert len(directories) == 2
    scores = sorted(pd.read_csv(directory / "results.csv")["score"].tolist()[0] for directory in directories)
    assert scores == [1, 2]


def test_concurrent_runs_of_same_config_compute_once(tmp_path):
    outcomes = _run_concurrently(tmp_path, [1, 1])
    computed = [outcome for outcome in outcomes if outcome[0] == "ok" and outcome[2] is False]
    assert len(computed) == 1
    # The other run either found the lock held or, if it started late, the finished marker.
    other = [outcome for outcome in outcomes if outcome not in computed][0]
    lock_rejected = other[0] == "error" and "is taken by another run" in other[1]
    assert lock_rejected or other[2] is True
    assert len(list((tmp_path / "shared").rglob("results.csv"))) == 1


def test_missing_results_dir_is_reported(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.paths.results_dir = None
    with pytest.raises(ValueError, match="results_dir"):
        common.run_experiment(cfg, "unit", table_body())


def test_find_completed_runs(tmp_path):
    common.run_experiment(make_cfg(tmp_path, value=1), "unit", table_body())
    with pytest.raises(RuntimeError):
        common.run_experiment(make_cfg(tmp_path, value=2), "unit", failing_body)
    runs = common.find_completed_runs(tmp_path / "results", "unit")
    assert len(runs) == 1
    assert json.loads((runs[0] / "summary.json").read_text())["value"] == 1
