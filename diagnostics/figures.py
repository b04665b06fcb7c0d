"""Saving the headless figures of :mod:`diagnostics.plots` and :mod:`diagnostics.histograms`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Drawn:
    """A PNG written by :func:`save_drawn`, with the layout of its figure.

    Attributes:
        png: the PNG's path.
        width_px, height_px: its size in pixels (figure inches x :data:`DPI`).
        panels: axes that show something (an image, data or text); empty grid cells are
            removed before saving, so this is what the reader sees.
        rows, columns: the grid the panels were laid out on.
        details: figure-specific facts (what was read, points, layers...), JSON-ready.
    """

    png: Path
    width_px: int
    height_px: int
    panels: int
    rows: int
    columns: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``png`` as a string, the layout, then ``details``' keys."""
        return {"png": str(self.png), "width_px": self.width_px, "height_px": self.height_px,
                "panels": self.panels, "rows": self.rows, "columns": self.columns,
                **self.details}


def count_panels(fig: Figure) -> int:
    """Visible axes of ``fig`` that hold an image, plotted data, an artist or a text."""
    return sum(1 for ax in fig.axes
               if ax.get_visible() and (ax.images or ax.has_data() or ax.texts or ax.artists))


def save_drawn(fig: Figure, out: Path, *, rows: int, columns: int, **details: Any) -> Drawn:
    """:func:`save_figure`, returning the PNG with its layout (:class:`Drawn`).

    Args:
        fig: the figure; its size in inches times :data:`DPI` is the PNG's pixel size.
        out: PNG path (parents created).
        rows, columns: the panel grid.
        details: JSON-ready facts to report beside the layout.
    """
    width, height = fig.get_size_inches()
    panels = count_panels(fig)
    save_figure(fig, out)
    return Drawn(png=Path(out), width_px=int(round(width * DPI)),
                 height_px=int(round(height * DPI)), panels=panels, rows=rows,
                 columns=columns, details=details)
