"""Helpers shared by the figure generators."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import write_bytes_atomic  # noqa: E402

log = logging.getLogger(__name__)


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """Render ``figure`` as a 150 dpi PNG, write it atomically to ``path`` and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
    log.info("Wrote %s", path)
    return path
