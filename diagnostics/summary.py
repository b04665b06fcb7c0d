"""Keras-style layer summary of a registry backbone, with analytic output shapes and MACs.

Output shapes are *computed*, not measured: every spatial layer applies the formula the course
notes teach (CS231n, "Convolutional Networks"; PyTorch ``Conv2d``/``MaxPool2d`` docs)::

    out = floor((W - F + 2P) / S) + 1           (dilation 1)
    out = floor((W + 2P - D(F - 1) - 1) / S) + 1   (general, dilation D)

and the shapes are propagated through the torchvision AlexNet / VGG / MobileNet / EfficientNet
module trees (Sequential chains, MobileNet inverted residual and EfficientNet MBConv blocks,
squeeze-and-excitation side branches).
:func:`forward_shapes` measures the same shapes with forward hooks on a real forward pass; the
tests check that both agree for every backbone.

Multiply-accumulates count the weight multiplications of ``Conv2d`` and ``Linear`` layers per
image (``C_out * H_out * W_out * C_in/groups * F_h * F_w`` and ``in * out``); batch norm,
activations, pooling, the squeeze-and-excitation scaling and residual additions are not counted
(torchvision's ``_ops`` model metadata counts the same way, within ~1%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import SqueezeExcitation

from models.backbones.registry import CNNCodeModel

Shape = tuple[int, ...]
"""A per-image shape, batch axis left out: ``(C, H, W)`` or ``(D,)``."""

_SHAPE_PRESERVING = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
    nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Dropout, nn.Identity,
    StochasticDepth,
)


class ShapeInferenceError(NotImplementedError):
    """A module type the analytic shape propagation has no rule for."""


@dataclass(frozen=True)
class LayerRow:
    """One leaf layer of the summary.

    Attributes:
        name: dotted module path inside the :class:`~models.backbones.registry.CNNCodeModel`
            (``net.features.0.0``), or ``flatten`` for the functional flatten.
        type: the module's class name.
        output_shape: per-image output shape (batch axis left out).
        params: parameters owned by the layer.
        trainable_params: those with ``requires_grad``.
        macs: multiply-accumulates per image (Conv2d and Linear only, else 0).
    """

    name: str
    type: str
    output_shape: Shape
    params: int
    trainable_params: int
    macs: int

    @property
    def trainable(self) -> str:
        """``yes`` / ``no`` / ``partial``, or ``-`` for a layer without parameters."""
        if self.params == 0:
            return "-"
        if self.trainable_params == self.params:
            return "yes"
        return "no" if self.trainable_params == 0 else "partial"


@dataclass(frozen=True)
class ModelSummary:
    """The table and its totals.

    Attributes:
        backbone: registry name.
        input_shape: ``(3, S, S)``.
        rows: leaf layers in execution order.
    """

    backbone: str
    input_shape: Shape
    rows: list[LayerRow]

    @property
    def total_params(self) -> int:
        """All parameters."""
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        """Parameters with ``requires_grad``."""
        return sum(r.trainable_params for r in self.rows)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image."""
        return sum(r.macs for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: backbone, input_shape, rows, totals."""
        return {"backbone": self.backbone, "input_shape": list(self.input_shape),
                "rows": [asdict(r) | {"output_shape": list(r.output_shape),
                                      "trainable": r.trainable} for r in self.rows],
                "total_params": self.total_params, "trainable_params": self.trainable_params,
                "non_trainable_params": self.total_params - self.trainable_params,
                "macs": self.macs}

    def to_text(self) -> str:
        """The Keras-style table (``model.summary()``) with totals and MACs."""
        header = ("Layer (type)", "Output Shape", "Param #", "Trainable")
        body = [(f"{r.name} ({r.type})", "(None, " + ", ".join(map(str, r.output_shape)) + ")",
                 f"{r.params:,}", r.trainable) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                              row[2].rjust(widths[2]), row[3].ljust(widths[3])]).rstrip()

        rule = "=" * (sum(widths) + 6)
        size = "x".join(map(str, self.input_shape))
        lines = [f'Model: "{self.backbone}"  input (None, {size})', rule, fmt(header), rule,
                 *map(fmt, body), rule,
                 f"Total params: {self.total_params:,} "
                 f"({self.total_params * 4 / 2**20:.2f} MiB as float32)",
                 f"Trainable params: {self.trainable_params:,}",
                 f"Non-trainable params: {self.total_params - self.trainable_params:,}",
                 f"Multiply-accumulates: {self.macs:,} ({self.macs / 1e9:.3f} G) per image",
                 rule]
        return "\n".join(lines)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output side of a convolution or pooling window: ``floor((W - F + 2P) / S) + 1``.

    Args:
        size: input side W, pixels.
        kernel: window side F.
        stride: S.
        padding: P, added on both sides.
        dilation: D; the effective window is ``D * (F - 1) + 1``.
        ceil_mode: pooling's ``ceil_mode`` (round up, but never start a window in the
            right padding, as PyTorch does).

    Returns:
        The output side, pixels.

    Raises:
        ValueError: the window does not fit (output side < 1).
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise ValueError(f"window {kernel} (dilation {dilation}, padding {padding}) does not "
                         f"fit an input of side {size}")
    return out


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


class _Walker:
    """Propagates a per-image shape through a module tree, collecting :class:`LayerRow` s."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.rows: list[LayerRow] = []

    def leaf(self, module: nn.Module, shape: Shape, out: Shape, macs: int = 0) -> Shape:
        params = list(module.parameters(recurse=False))
        self.rows.append(LayerRow(
            name=self.names.get(id(module), "?"), type=type(module).__name__,
            output_shape=tuple(out), params=sum(p.numel() for p in params),
            trainable_params=sum(p.numel() for p in params if p.requires_grad), macs=macs))
        return tuple(out)

    def walk(self, module: nn.Module, shape: Shape) -> Shape:  # noqa: C901 (one rule per type)
        if isinstance(module, CNNCodeModel):
            fmap = self.walk(module.net.features, shape)
            pooled = self.walk(module.head_pool, fmap)
            flat = (math.prod(pooled),)
            self.rows.append(LayerRow("flatten", "torch.flatten", flat, 0, 0, 0))
            return self.walk(module.net.classifier, flat)
        if isinstance(module, nn.Sequential):
            for child in module:
                shape = self.walk(child, shape)
            return shape
        if isinstance(module, mobilenetv3.InvertedResidual):
            return self.walk(module.block, shape)  # + residual: same shape
        if isinstance(module, mobilenetv2.InvertedResidual):
            return self.walk(module.conv, shape)
        if isinstance(module, efficientnet.MBConv):
            out = self.walk(module.block, shape)
            if module.use_res_connect:  # stochastic depth on the branch, then + input
                out = self.walk(module.stochastic_depth, out)
            return out
        if isinstance(module, SqueezeExcitation):
            scale = self.walk(module.avgpool, shape)
            for child in (module.fc1, module.activation, module.fc2, module.scale_activation):
                scale = self.walk(child, scale)
            return shape  # the input, scaled channel-wise
        if isinstance(module, nn.Conv2d):
            c, h, w = shape
            (kh, kw), (sh, sw), (dh, dw) = (_pair(module.kernel_size), _pair(module.stride),
                                            _pair(module.dilation))
            if module.padding == "same":
                oh, ow = h, w
            else:
                ph, pw = (0, 0) if module.padding == "valid" else _pair(module.padding)
                oh = conv_output_size(h, kh, sh, ph, dh)
                ow = conv_output_size(w, kw, sw, pw, dw)
            co = module.out_channels
            macs = co * oh * ow * (c // module.groups) * kh * kw
            return self.leaf(module, shape, (co, oh, ow), macs)
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            c, h, w = shape
            k, s, p = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), \
                _pair(module.padding)
            d = _pair(getattr(module, "dilation", 1))
            return self.leaf(module, shape, (
                c, conv_output_size(h, k[0], s[0], p[0], d[0], module.ceil_mode),
                conv_output_size(w, k[1], s[1], p[1], d[1], module.ceil_mode)))
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            c, h, w = shape
            oh, ow = _pair(module.output_size)
            return self.leaf(module, shape, (c, oh or h, ow or w))
        if isinstance(module, nn.Linear):
            return self.leaf(module, shape, (*shape[:-1], module.out_features),
                             module.in_features * module.out_features * math.prod(shape[:-1]))
        if isinstance(module, nn.Flatten):
            return self.leaf(module, shape, (math.prod(shape),))
        if isinstance(module, _SHAPE_PRESERVING):
            return self.leaf(module, shape, shape)
        raise ShapeInferenceError(f"no shape rule for {type(module).__name__} "
                                  f"({self.names.get(id(module), '?')})")


def summarize(model: CNNCodeModel, input_size: int) -> ModelSummary:
    """The per-layer table of ``model`` for a square RGB input of side ``input_size``.

    Args:
        model: a registry model (``build_backbone``); its ``requires_grad`` flags decide
            the trainable column.
        input_size: input side S in pixels; the input is ``(3, S, S)``.

    Returns:
        A :class:`ModelSummary`; shapes computed analytically (no forward pass).

    Raises:
        ShapeInferenceError: a layer type without a shape rule.
        ValueError: the input is too small for some window.
    """
    walker = _Walker(model)
    walker.walk(model, (3, input_size, input_size))
    return ModelSummary(backbone=model.info.name, input_shape=(3, input_size, input_size),
                        rows=walker.rows)


def forward_shapes(model: nn.Module, input_size: int) -> dict[str, Shape]:
    """Measured per-image output shape of every leaf module, from one real forward pass.

    Args:
        model: any module taking ``(N, 3, S, S)`` float32.
        input_size: S, pixels.

    Returns:
        ``{module name: output shape without the batch axis}`` for modules without children
        that ran (first call wins).
    """
    shapes: dict[str, Shape] = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                shapes.setdefault(name, tuple(out.shape[1:]))
            handles.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
