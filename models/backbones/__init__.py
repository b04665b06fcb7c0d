"""The torch side of :mod:`models`: the backbone registry with CNN-code taps.

The only subpackage of :mod:`models` that imports torch; the service, batch jobs and the
Bento never import it. See :mod:`models.backbones.registry`.
"""

from models.backbones.registry import (BackboneInfo, CNNCodeModel, CNNCodes,  # noqa: F401
                                       WeightsNotFoundError, build_backbone, get_backbone_info,
                                       list_backbones, torch_hub_checkpoint_path)
