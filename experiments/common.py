"""Run bookkeeping shared by every Hydra experiment.

A run is one resolved configuration. :func:`run_experiment` wraps an
experiment's body and gives every run the same life cycle:

1. Hash the resolved configuration together with a fingerprint of the code
   (:func:`config_hash`). Keys that do not change results are left out: the
   ``hydra`` node, every value that reads Hydra's runtime (output and log
   directories), and :data:`NON_RESULT_KEYS`.
2. Look for the completion marker ``<results_dir>/<experiment>/<hash>/COMPLETE``.
   If it exists the run is skipped and the stored summary is returned, so a
   multirun that was interrupted resumes where it stopped when started again.
3. Claim the hash with a lock file created with ``O_CREAT | O_EXCL``, so two
   runs of the same configuration never compute or write at the same time.
   A lock left by a dead process on this host is taken over.
4. Claim an output directory: the Hydra output directory itself, or, when
   another run has already claimed it (two runs started in the same second,
   or a fixed ``hydra.run.dir`` used twice), a fresh unique subdirectory.
5. Seed ``random``, NumPy and torch from ``cfg.seed``, run the body, then write
   ``config.yaml`` (resolved), ``results.csv`` (tidy, one row per image and
   setting) and ``summary.json`` into the output directory, each through a
   temporary file in the same folder and ``os.replace``.
6. Copy the output files into the results store and write the marker last.

Layout of the results store (``cfg.paths.results_dir``)::

    <results_dir>/<experiment>/<hash>/
        config.yaml  results.csv  summary.json  <artefacts>  COMPLETE
        .lock        (only while a run holds the hash)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from parchgrad._atomic import write_atomic

log = logging.getLogger(__name__)

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml share their names with
# the launcher plugins' structured configs, so Hydra 1.3 validates them against those
# schemas and warns that this matching is deprecated. The validation is wanted; the
# warning, printed once per job, is not.
warnings.filterwarnings(
    "ignore",
    message=r"\s*'hydra/launcher/(joblib|submitit_local|submitit_slurm)' is validated against ConfigStore schema",
    category=UserWarning,
)

__all__ = [
    "COMPLETE_MARKER",
    "NON_RESULT_KEYS",
    "RunContext",
    "RunResult",
    "absolute_path",
    "code_fingerprint",
    "config_hash",
    "find_completed_runs",
    "hashed_config",
    "markdown_table",
    "mean_confidence_interval",
    "resolve_path_keys",
    "run_experiment",
    "save_npz_atomic",
    "seed_everything",
    "summarize_table",
    "to_plain",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

COMPLETE_MARKER = "COMPLETE"
LOCK_FILE = ".lock"
OUTPUT_CLAIM_FILE = ".parchgrad-run"

# Dotted keys that never change a run's numbers, so they stay out of the hash.
NON_RESULT_KEYS = frozenset(
    {
        "hydra",
        "paths.output_dir",
        "paths.log_dir",
        "paths.results_dir",
        "progress",
        "num_workers",
    }
)

# Keys whose string values are file system paths; relative ones are resolved
# against the launch directory. Any key ending in one of these suffixes counts.
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "root")

# Files of an output directory that are not copied into the results store.
_UNPUBLISHED = {OUTPUT_CLAIM_FILE}


# ---------------------------------------------------------------------------
# Configuration hashing, seeding, paths


def _drop_key(container: dict, dotted: str) -> None:
    node = container
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def _without_runtime_values(raw: Any, resolved: Any, runtime_dir: str | None) -> Any:
    """Return ``resolved`` without the values that depend on the Hydra runtime.

    ``raw`` is the same tree before interpolation: a value whose raw text reads
    a ``${hydra:...}`` resolver, or whose resolved text lies under the run's
    output directory, differs between two runs of the same settings.
    """
    if isinstance(resolved, dict):
        kept = {}
        for key, value in resolved.items():
            raw_value = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(raw_value, str) and "${hydra:" in raw_value:
                continue
            if runtime_dir and isinstance(value, str) and value.startswith(runtime_dir):
                continue
            kept[key] = _without_runtime_values(raw_value, value, runtime_dir)
        return kept
    if isinstance(resolved, list):
        raw_list = raw if isinstance(raw, list) and len(raw) == len(resolved) else [None] * len(resolved)
        return [_without_runtime_values(r, v, runtime_dir) for r, v in zip(raw_list, resolved)]
    return resolved


def _runtime_output_dir() -> str | None:
    if not HydraConfig.initialized():
        return None
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    return str(output_dir) if output_dir else None


def hashed_config(cfg: DictConfig) -> dict:
    """Return the resolved configuration as a plain dict, without the keys excluded from the hash."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NON_RESULT_KEYS:
        _drop_key(raw, dotted)
        _drop_key(resolved, dotted)
    return _without_runtime_values(raw, resolved, _runtime_output_dir())


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Return a SHA-256 prefix of the Python sources that produce results.

    Covers ``parchgrad/``, ``experiments/`` and ``scripts/``, so a finished run
    is reused only while the code that made it is unchanged.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("parchgrad", "experiments", "scripts"):
        for source in sorted((root / package).rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode("utf-8"))
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def config_hash(cfg: DictConfig, length: int = 16) -> str:
    """Return a hex SHA-256 prefix of :func:`hashed_config` and :func:`code_fingerprint`."""
    payload = {"config": hashed_config(cfg), "code": code_fingerprint()}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def seed_everything(seed: int | None) -> None:
    """Seed ``random``, NumPy and torch; ``None`` leaves the generators unseeded (0 is a seed)."""
    if seed is None:
        log.info("No seed set (key `seed`); results may differ between runs.")
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or null, got {seed!r} of type {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    log.info("Seeded random, numpy and torch with %d (key `seed`)", seed)


def absolute_path(path: str | os.PathLike) -> Path:
    """Resolve ``path`` against the launch directory, whatever Hydra's working directory is."""
    return Path(to_absolute_path(str(path)))


def resolve_path_keys(cfg: DictConfig) -> None:
    """Make every relative path value of ``cfg`` absolute, in place, against the launch directory.

    Path values are the strings of :data:`PATH_KEY_SUFFIXES` keys, outside the
    ``hydra`` node; URLs, ``null`` and interpolations that fail are left alone.
    """

    def visit(node: DictConfig, prefix: str) -> None:
        for key in list(node.keys()):
            dotted = f"{prefix}{key}"
            if dotted == "hydra":
                continue
            try:
                value = node[key]
            except Exception:  # an interpolation that cannot resolve here
                continue
            if isinstance(value, DictConfig):
                visit(value, f"{dotted}.")
            elif (
                isinstance(value, str)
                and str(key).endswith(PATH_KEY_SUFFIXES)
                and value
                and "://" not in value
                and not os.path.isabs(value)
            ):
                with open_dict(node):
                    node[key] = str(absolute_path(value))
                log.debug("Resolved %s=%s against the launch directory", dotted, node[key])

    visit(cfg, "")


# ---------------------------------------------------------------------------
# Atomic writes


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    return write_atomic(path, lambda file: file.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON: {value!r}")


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None, since strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically; NaN becomes ``null``."""
    text = json.dumps(_json_safe(json.loads(json.dumps(data, default=_json_default))), indent=2)
    return write_text_atomic(path, text + "\n")


def write_csv_atomic(path: str | os.PathLike, table: pd.DataFrame) -> Path:
    """Write ``table`` as CSV without the index, atomically."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return write_text_atomic(path, buffer.getvalue())


def save_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    """Save ``arrays`` (NumPy arrays or tensors) as a compressed ``.npz``, atomically."""
    buffer = io.BytesIO()
    converted = {
        name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        for name, value in arrays.items()
    }
    np.savez_compressed(buffer, **converted)
    return write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------
# Locks and output directory claims


def _lock_owner_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the process exists but belongs to another user
        return True
    return True


def _lock_is_stale(lock_path: Path) -> bool:
    """Return True when the lock's owner is a process of this host that no longer runs."""
    try:
        owner = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        # An empty or half-written lock: its owner died between create and write,
        # or is writing right now. Only the first case lasts, so wait a moment.
        time.sleep(0.5)
        try:
            owner = json.loads(lock_path.read_text())
        except (OSError, ValueError):
            return True
    if owner.get("host") != socket.gethostname():
        return False
    return not _process_alive(int(owner.get("pid", -1)))


@contextlib.contextmanager
def hold_lock(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path``, created with ``O_EXCL``, for the duration of the block.

    Raises:
        RuntimeError: if a live process holds the lock, or one on another host
            (which cannot be checked), naming the lock file to delete once no
            run uses it.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            handle = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if attempt == 0 and _lock_is_stale(lock_path):
                log.warning("Taking over the stale lock %s left by a process that has exited", lock_path)
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()
                continue
            owner = lock_path.read_text(errors="replace") if lock_path.exists() else "unknown"
            raise RuntimeError(
                f"Lock {lock_path} is taken by another run (owner {owner}). Wait for it to finish, or "
                "delete the lock file if no run of this configuration is active."
            ) from None
    try:
        with os.fdopen(handle, "w") as lock_file:
            lock_file.write(_lock_owner_text())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()


def claim_output_dir(base: Path, experiment: str, digest: str) -> Path:
    """Return a directory under ``base`` that no other run writes to.

    The first run claims ``base`` itself with an ``O_EXCL`` marker file; a later
    or concurrent run that finds the marker gets a new unique subdirectory.
    """
    base.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(base / OUTPUT_CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        unique = Path(tempfile.mkdtemp(prefix=f"{experiment}-{digest[:8]}-", dir=base))
        log.info("Output directory %s is used by another run; writing to %s", base, unique)
        return unique
    with os.fdopen(handle, "w") as claim:
        claim.write(_lock_owner_text())
    return base


# ---------------------------------------------------------------------------
# The run life cycle


@dataclass
class RunResult:
    """Output of an experiment body: the tidy results table and extra summary entries."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Configuration and output locations passed to an experiment body."""

    cfg: DictConfig
    experiment: str
    config_hash: str
    output_dir: Path
    store_dir: Path

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> Path:
        """Save ``arrays`` to ``<output_dir>/<name>`` as ``.npz``, atomically."""
        path = save_npz_atomic(self.output_dir / name, arrays)
        log.info("Saved arrays %s to %s", sorted(arrays), path)
        return path

    def save_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``<output_dir>/<name>``, atomically."""
        return write_text_atomic(self.output_dir / name, text)


def _output_base(cfg: DictConfig) -> Path:
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_missing=False)
    if output_dir in (None, "", "???"):
        output_dir = _runtime_output_dir()
    if output_dir is None:
        raise ValueError(
            "No output directory: set `paths.output_dir`, or run the experiment through "
            "its Hydra entry point, which sets it to Hydra's output directory."
        )
    return absolute_path(output_dir)


def _results_root(cfg: DictConfig) -> Path:
    results_dir = OmegaConf.select(cfg, "paths.results_dir", default=None, throw_on_missing=False)
    if results_dir in (None, "", "???"):
        raise ValueError("`paths.results_dir` is not set; it names the results store shared by all runs.")
    return absolute_path(results_dir)


def _resolved_yaml(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return OmegaConf.to_yaml(OmegaConf.create(container))


def _publish(output_dir: Path, store_dir: Path) -> list[str]:
    """Copy the output directory's result files into the store; subfolders and logs stay behind."""
    published = []
    for path in sorted(output_dir.iterdir()):
        if not path.is_file() or path.name in _UNPUBLISHED or path.name.startswith("."):
            continue
        if path.suffix == ".log":
            continue
        write_bytes_atomic(store_dir / path.name, path.read_bytes())
        published.append(path.name)
    return published


def load_completed_summary(store_dir: Path) -> dict[str, Any]:
    """Return the stored ``summary.json`` of a finished run."""
    with open(store_dir / "summary.json") as summary_file:
        return json.load(summary_file)


def run_experiment(
    cfg: DictConfig,
    experiment: str,
    body: Callable[[RunContext], RunResult],
) -> dict[str, Any]:
    """Run ``body`` once per resolved configuration and record its outputs.

    Returns the summary dict written to ``summary.json``, with ``skipped``
    True when a finished run of the same configuration was found. Every step
    is logged with its config key; exceptions are logged with the output
    directory, then re-raised.

    Raises:
        RuntimeError: if another live run holds this configuration's lock.
        ValueError: if ``paths.results_dir`` or the output directory is unset.
    """
    resolve_path_keys(cfg)
    digest = config_hash(cfg)
    store_dir = _results_root(cfg) / experiment / digest
    marker = store_dir / COMPLETE_MARKER

    if marker.exists():
        log.info("Skipping %s: configuration %s already finished; results in %s", experiment, digest, store_dir)
        summary = load_completed_summary(store_dir)
        summary["skipped"] = True
        return summary

    with hold_lock(store_dir / LOCK_FILE):
        # A run may have finished between the check above and taking the lock.
        if marker.exists():
            log.info("Skipping %s: configuration %s finished meanwhile; results in %s", experiment, digest, store_dir)
            summary = load_completed_summary(store_dir)
            summary["skipped"] = True
            return summary

        output_dir = claim_output_dir(_output_base(cfg), experiment, digest)
        log.info("Running %s with configuration hash %s; output directory: %s", experiment, digest, output_dir)
        context = RunContext(cfg=cfg, experiment=experiment, config_hash=digest, output_dir=output_dir, store_dir=store_dir)
        try:
            write_text_atomic(output_dir / "config.yaml", _resolved_yaml(cfg))
            seed_everything(cfg.get("seed"))
            started = time.perf_counter()
            result = body(context)
            elapsed = time.perf_counter() - started

            summary = {
                "experiment": experiment,
                "config_hash": digest,
                "code_fingerprint": code_fingerprint(),
                "output_dir": str(output_dir),
                "store_dir": str(store_dir),
                "rows": int(len(result.table)),
                "elapsed_s": round(elapsed, 3),
                **result.summary,
            }
            write_csv_atomic(output_dir / "results.csv", result.table)
            write_json_atomic(output_dir / "summary.json", summary)
            published = _publish(output_dir, store_dir)
            write_json_atomic(
                marker,
                {"config_hash": digest, "output_dir": str(output_dir), "files": published, "finished": time.time()},
            )
        except BaseException as error:
            log.error(
                "Run of %s (configuration %s) failed; output directory: %s\n%s",
                experiment,
                digest,
                output_dir,
                "".join(traceback.format_exception(error)),
            )
            raise

    log.info("Finished %s in %.1f s; results in %s and %s", experiment, elapsed, output_dir, store_dir)
    summary["skipped"] = False
    return summary


def find_completed_runs(results_dir: str | os.PathLike, experiment: str) -> list[Path]:
    """Return the store directories of ``experiment`` that carry a completion marker, oldest first."""
    root = Path(results_dir) / experiment
    if not root.is_dir():
        return []
    runs = [path for path in root.iterdir() if (path / COMPLETE_MARKER).is_file()]
    return sorted(runs, key=lambda path: (path / COMPLETE_MARKER).stat().st_mtime)


# ---------------------------------------------------------------------------
# Summaries


def mean_confidence_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Return the mean, Student-t confidence interval and count of the finite ``values``.

    The interval is NaN with fewer than two finite values.
    """
    from scipy import stats

    array = np.asarray(list(values), dtype=np.float64)
    array = array[np.isfinite(array)]
    count = int(array.size)
    if count == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(array.mean())
    if count < 2:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n": count}
    half_width = float(stats.t.ppf(0.5 + confidence / 2, count - 1) * stats.sem(array))
    return {"mean": mean, "ci_low": mean - half_width, "ci_high": mean + half_width, "n": count}


def summarize_table(
    table: pd.DataFrame,
    group_columns: Sequence[str],
    metric_columns: Sequence[str],
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Return one row per group with ``<metric>_mean``, ``_ci_low``, ``_ci_high`` and ``_n`` columns.

    Missing group values (NaN, e.g. the quantile of the plain method) form
    their own group instead of being dropped.
    """
    rows = []
    for keys, group in table.groupby(list(group_columns), dropna=False, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(group_columns, keys))
        for metric in metric_columns:
            interval = mean_confidence_interval(group[metric], confidence)
            for stat, value in interval.items():
                row[f"{metric}_{stat}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(
    summary: pd.DataFrame,
    group_columns: Sequence[str],
    metric_columns: Sequence[str],
) -> str:
    """Format a :func:`summarize_table` result as Markdown, each metric as ``mean [low, high]``."""
    header = list(group_columns) + list(metric_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [_format_cell(row[column]) for column in group_columns]
        for metric in metric_columns:
            mean = row[f"{metric}_mean"]
            low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
            if isinstance(low, float) and math.isnan(low):
                cells.append(_format_cell(mean))
            else:
                cells.append(f"{_format_cell(mean)} [{_format_cell(low)}, {_format_cell(high)}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_plain(value: Any) -> Any:
    """Return ``value`` with OmegaConf containers turned into plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
