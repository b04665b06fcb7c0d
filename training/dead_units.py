"""Dead units of the embedding layer (the course notes' "dead nodes").

Definition used everywhere in this project: an embedding unit is **dead** on a data set when
its activation is ``<= 0`` for every image of that set. The embedding is the CNN code each
backbone exposes (:attr:`models.backbones.registry.CNNCodes.embedding`):

* VGG: fc7 after ReLU. ReLU outputs are ``>= 0``, so dead means exactly zero on every image:
  a ReLU unit whose pre-activation is negative for all inputs gets no gradient and cannot
  recover (the classic dying-ReLU failure).
* MobileNetV2: the global average pool of the last ReLU6 feature map; a pooled value is 0
  only when that channel is 0 at every position of every image.
* MobileNetV3: the pre-logits ``Linear + Hardswish``. Hardswish is negative on (-3, 0) and
  exactly 0 at or below -3, so "never fires" means the output is never positive; its
  gradient is not zero on (-3, 0), so such a unit is dormant rather than unrecoverable.

The fraction is reported per epoch on the val set as ``dead_units`` in ``metrics.jsonl``
(:func:`training.loop.evaluate`). It lives in :mod:`training` so the trainer does not depend on
:mod:`diagnostics`; :mod:`diagnostics.dead_units` re-exports it.
"""

from __future__ import annotations

import torch


class DeadUnitTracker:
    """Accumulates, per unit, the largest activation seen over batches.

    Example::

        tracker = DeadUnitTracker()
        for images, _ in val_loader:
            tracker.update(model(images).embedding)
        tracker.fraction  # e.g. 0.031
    """

    def __init__(self) -> None:
        self._max: torch.Tensor | None = None

    def update(self, activations: torch.Tensor) -> None:
        """Fold in one batch.

        Args:
            activations: ``(N, D)`` (any float dtype, any device); extra trailing axes are
                reduced too, so ``(N, C, H, W)`` feature maps count channels as units.

        Raises:
            ValueError: ``D`` differs from earlier batches.
        """
        batch_max = activations.detach().float().flatten(2).amax(dim=(0, 2)) \
            if activations.ndim > 2 else activations.detach().float().amax(dim=0)
        batch_max = batch_max.cpu()
        if self._max is None:
            self._max = batch_max
        elif self._max.shape != batch_max.shape:
            raise ValueError(f"expected {tuple(self._max.shape)} units, got "
                             f"{tuple(batch_max.shape)}")
        else:
            self._max = torch.maximum(self._max, batch_max)

    @property
    def dead_mask(self) -> torch.Tensor:
        """``(D,)`` bool: True for units whose activation was ``<= 0`` on every image.

        Raises:
            RuntimeError: no batch was seen.
        """
        if self._max is None:
            raise RuntimeError("no activations were recorded")
        return self._max <= 0

    @property
    def fraction(self) -> float:
        """Dead units / all units, in [0, 1]."""
        return float(self.dead_mask.float().mean())


def dead_unit_fraction(activations: torch.Tensor) -> float:
    """Fraction of units that are ``<= 0`` for every row of ``activations`` ``(N, D)``."""
    tracker = DeadUnitTracker()
    tracker.update(activations)
    return tracker.fraction
