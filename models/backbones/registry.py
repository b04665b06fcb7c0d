"""Backbone registry: torchvision AlexNet / VGG / MobileNet / EfficientNet builders with CNN-code
taps.

Every registered backbone is built by :func:`build_backbone` (keyword-only, typed) and returns
a :class:`CNNCodeModel` whose single forward pass yields ``logits``, ``embedding`` (the
penultimate layer, the classic "CNN code") and ``features`` (globally average-pooled output of
the convolutional feature extractor). Dims are declared in :class:`BackboneInfo`; a contract
test checks them for every backbone.

Weights: a torchvision weights enum name (``DEFAULT``, ``IMAGENET1K_V1``...), read from the
torch hub cache (``$TORCH_HOME/hub/checkpoints/``) without downloading; a local checkpoint
path; or ``None`` (random initialisation).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from models.preprocessing import PreprocessSpec

logger = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """Requested weights are not available locally (downloads are not attempted)."""


class CNNCodes(NamedTuple):
    """The three outputs of one forward pass, all float32.

    Attributes:
        logits: ``(N, K)`` class scores (before softmax).
        embedding: ``(N, D)`` penultimate-layer activations (the CNN code).
        features: ``(N, C)`` global average pool of the last conv feature map.
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone is and what it outputs.

    Attributes:
        name: registry name (torchvision's model name).
        family: ``alexnet``, ``vgg``, ``mobilenet`` or ``efficientnet``.
        embedding_dim: D, width of the penultimate layer.
        features_dim: C, channels of the last conv feature map.
        builder: torchvision model builder (``torchvision.models.vgg16``...).
        weights_enum: the torchvision weights enum class.
        embedding_layer: where the embedding is tapped, in words.
    """

    name: str
    family: str
    embedding_dim: int
    features_dim: int
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]
    embedding_layer: str

    @property
    def preprocessing(self) -> PreprocessSpec:
        """Eval preprocessing of the DEFAULT weights' ``transforms()`` preset."""
        return preprocess_spec_from_weights(self.weights_enum.DEFAULT)

    @property
    def default_input_size(self) -> int:
        """Input side in pixels (the crop size of the DEFAULT weights' preset)."""
        return self.preprocessing.crop_size


_REGISTRY: dict[str, BackboneInfo] = {}


def _register(info: BackboneInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f"backbone {info.name!r} registered twice")
    _REGISTRY[info.name] = info


for _name, _builder, _enum, _bn in [
    ("vgg11", tvm.vgg11, tvm.VGG11_Weights, False),
    ("vgg11_bn", tvm.vgg11_bn, tvm.VGG11_BN_Weights, True),
    ("vgg16", tvm.vgg16, tvm.VGG16_Weights, False),
    ("vgg16_bn", tvm.vgg16_bn, tvm.VGG16_BN_Weights, True),
]:
    _register(BackboneInfo(_name, "vgg", 4096, 512, _builder, _enum, "fc7 after ReLU"))
_register(BackboneInfo("mobilenet_v2", "mobilenet", 1280, 1280, tvm.mobilenet_v2,
                       tvm.MobileNet_V2_Weights, "global pool of the 1280-channel last conv"))
_register(BackboneInfo("mobilenet_v3_small", "mobilenet", 1024, 576, tvm.mobilenet_v3_small,
                       tvm.MobileNet_V3_Small_Weights, "pre-logits Linear+Hardswish"))
_register(BackboneInfo("mobilenet_v3_large", "mobilenet", 1280, 960, tvm.mobilenet_v3_large,
                       tvm.MobileNet_V3_Large_Weights, "pre-logits Linear+Hardswish"))
# AlexNet (Krizhevsky et al., 2012; torchvision's one-GPU variant, 61,100,840 parameters):
# pools to 6x6 before fc6, the CNN code is fc7 after ReLU as for VGG.
_register(BackboneInfo("alexnet", "alexnet", 4096, 256, tvm.alexnet, tvm.AlexNet_Weights,
                       "fc7 after ReLU"))
# EfficientNet-B0 (Tan & Le, 2019; 5,288,548 parameters): the head is Dropout + Linear, so the
# penultimate layer is the global pool of the 1280-channel last conv, as for MobileNetV2.
_register(BackboneInfo("efficientnet_b0", "efficientnet", 1280, 1280, tvm.efficientnet_b0,
                       tvm.EfficientNet_B0_Weights, "global pool of the 1280-channel last conv"))


def list_backbones() -> list[BackboneInfo]:
    """All registered backbones, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_backbone_info(name: str) -> BackboneInfo:
    """The registry entry for ``name``.

    Raises:
        KeyError: unknown backbone (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(_REGISTRY)}") from None


def preprocess_spec_from_weights(weights: WeightsEnum) -> PreprocessSpec:
    """Read resize/crop/interpolation/mean/std from ``weights.transforms()``.

    Source: torchvision's ``ImageClassification`` preset attached to each weights enum.
    """
    preset = weights.transforms()
    return PreprocessSpec(
        resize_size=int(preset.resize_size[0]),
        crop_size=int(preset.crop_size[0]),
        interpolation=preset.interpolation.value,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
    )


class CNNCodeModel(nn.Module):
    """A torchvision classifier with timm-style taps for its CNN codes.

    ``forward_features`` gives the conv feature map, ``forward_head(fmap, pre_logits=True)`` the
    penultimate-layer embedding, and ``forward`` all three outputs in one pass.

    Input: ``(N, 3, H, W)`` float32, normalised with the spec's mean/std.
    """

    def __init__(self, net: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        self.net = net
        self.info = info
        classifier = net.classifier
        if not isinstance(classifier, nn.Sequential) or not isinstance(classifier[-1], nn.Linear):
            raise TypeError(f"{info.name}: expected a Sequential classifier ending in Linear")
        # VGG pools to 7x7 and AlexNet to 6x6 before fc6; EfficientNet pools to 1x1; MobileNetV2
        # has no pooling module (it pools in forward).
        self.head_pool: nn.Module = getattr(net, "avgpool", nn.AdaptiveAvgPool2d(1))

    @property
    def num_classes(self) -> int:
        """K, the number of classes of the final Linear layer."""
        return self.net.classifier[-1].out_features

    @property
    def classifier_layer(self) -> nn.Linear:
        """The final Linear layer (penultimate -> logits): the "head" trained in every mode."""
        return self.net.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a freshly initialised one of ``num_classes`` outputs."""
        old = self.classifier_layer
        self.net.classifier[-1] = nn.Linear(old.in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 -> last conv feature map ``(N, C, h, w)`` float32."""
        return self.net.features(x)

    def forward_head(self, fmap: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> ``(N, D)`` embedding if ``pre_logits`` else ``(N, K)`` logits."""
        pooled = torch.flatten(self.head_pool(fmap), 1)
        embedding = self.net.classifier[:-1](pooled)
        return embedding if pre_logits else self.net.classifier[-1](embedding)

    def forward(self, x: torch.Tensor) -> CNNCodes:
        """``(N, 3, H, W)`` float32 -> :class:`CNNCodes` (logits, embedding, features)."""
        fmap = self.forward_features(x)
        embedding = self.forward_head(fmap, pre_logits=True)
        logits = self.net.classifier[-1](embedding)
        features = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return CNNCodes(logits=logits, embedding=embedding, features=features)


def torch_hub_checkpoint_path(weights: WeightsEnum) -> Path:
    """Where torchvision caches ``weights``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights_enum(info: BackboneInfo, name: str) -> WeightsEnum:
    """``"DEFAULT"`` / ``"IMAGENET1K_V1"`` / ``"VGG16_Weights.IMAGENET1K_V1"`` -> enum member.

    Raises:
        ValueError: not a member of this backbone's weights enum.
    """
    member = name.split(".")[-1]
    try:
        return info.weights_enum[member]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a weights name of {info.name}; "
            f"choose from {list(info.weights_enum.__members__)}, a checkpoint path, or none"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (``torch.load(weights_only=True)``).

    Accepts a plain state dict, or a training checkpoint holding one under ``model_state``
    (whose keys may carry our ``net.`` prefix).

    Raises:
        WeightsNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    return {k.removeprefix("net."): v for k, v in state.items()}


def _checkpoint_num_classes(state: dict[str, torch.Tensor]) -> int:
    """K of a registry backbone's torchvision state dict: rows of its last
    ``classifier.N.weight``."""
    linear = [k for k, v in state.items() if k.startswith("classifier.") and k.endswith(".weight")
              and v.ndim == 2]
    if not linear:
        raise ValueError("checkpoint has no classifier.N.weight: not the state dict of a "
                         "registry backbone")
    last = max(linear, key=lambda k: int(k.split(".")[1]))
    return int(state[last].shape[0])


def build_backbone(
    name: str, *, weights: str | Path | None = None, num_classes: int | None = None
) -> CNNCodeModel:
    """Build a registered backbone with CNN-code taps.

    Args:
        name: registry name, e.g. ``"mobilenet_v3_large"``.
        weights: ``None`` / ``"none"`` (random init), a torchvision weights name such as
            ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` (read from the torch hub cache, never
            downloaded), or a path to a local checkpoint (``.pth``/``.pt``).
        num_classes: K of the returned model; when it differs from the weights' class count
            the final Linear is replaced by a new, randomly initialised one. ``None`` keeps the
            weights' K (1000 for ImageNet weights and random init).

    Returns:
        The model in eval mode, float32, on the CPU.

    Raises:
        KeyError: unknown backbone.
        ValueError: unknown weights name.
        WeightsNotFoundError: enum weights not in the cache, or checkpoint path missing; the
            message names the path looked at and how to pass a local file.
    """
    info = get_backbone_info(name)
    state: dict[str, torch.Tensor] | None = None
    if weights is None or str(weights).lower() == "none":
        source_classes = 1000
    elif _looks_like_path(weights):
        state = load_state_dict_file(weights)
        source_classes = _checkpoint_num_classes(state)
    else:
        enum = resolve_weights_enum(info, str(weights))
        cached = torch_hub_checkpoint_path(enum)
        if not cached.is_file():
            raise WeightsNotFoundError(
                f"{name} weights {enum} are not in the torch hub cache: looked for {cached} "
                f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). Downloads are not "
                f"attempted. Copy {os.path.basename(cached)} there, or pass a local checkpoint "
                f"with --weights /path/to/file.pth"
            )
        state = load_state_dict_file(cached)
        source_classes = len(enum.meta["categories"])
    net = info.builder(weights=None, num_classes=source_classes)
    if state is not None:
        net.load_state_dict(state)
        logger.info("loaded %s weights from %s", name, weights)
    model = CNNCodeModel(net, info)
    if num_classes is not None and num_classes != source_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def _looks_like_path(weights: str | Path) -> bool:
    text = str(weights)
    return isinstance(weights, Path) or os.sep in text or text.endswith((".pt", ".pth"))
