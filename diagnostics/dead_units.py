"""Dead units of the embedding layer: re-exported from :mod:`training.dead_units`.

The implementation lives in :mod:`training` (the trainer reports ``dead_units`` every epoch),
so that imports run one way only, diagnostics -> training. See :mod:`training.dead_units` for
the definition (an embedding unit is dead when it is ``<= 0`` on every image of a set).
"""

from __future__ import annotations

from training.dead_units import DeadUnitTracker, dead_unit_fraction

__all__ = ["DeadUnitTracker", "dead_unit_fraction"]
