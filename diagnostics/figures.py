"""Saving the headless figures of :mod:`diagnostics.plots` and :mod:`diagnostics.histograms`."""

from __future__ import annotations

import logging
from pathlib import Path

from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DPI = 100
"""Resolution of every PNG (dots per inch)."""


def save_figure(fig: Figure, out: Path) -> Path:
    """Render ``fig`` with the Agg canvas to the PNG ``out`` (parents created); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    logger.info("wrote %s", out)
    return out
