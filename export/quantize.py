"""Precision variants of an exported fp32 model: int8 (static QDQ quantisation) and fp16.

Both variants keep the fp32 model's interface: input ``images`` uint8 ``(N, S, S, 3)`` and
outputs ``logits``, ``embedding``, ``features`` float32 with the same dynamic batch axis, so
the service serves them unchanged.

* **int8** (CPU): onnxruntime static quantisation in QDQ format, weights int8 per output
  channel, activations uint8 calibrated (min/max) on preprocessed *training* images. The
  normalisation prefix of the graph (uint8 -> float cast, /255, mean/std) stays float; only
  the network after it is quantised. onnxruntime's CPU provider fuses the QDQ pairs into
  integer kernels (QLinearConv, QGemm, ...).
* **fp16** (GPU): every float tensor and weight converted to float16 except the graph's
  inputs/outputs (``keep_io_types``). Meant for the CUDA / TensorRT providers; onnxruntime's
  CPU provider runs it, but several times slower than fp32.

A variant is compared with its fp32 reference on real images (:func:`compare_variant`) and is
published only if the figures meet :class:`VariantThresholds`.

Heavy imports (onnx, onnxruntime.quantization) happen inside functions.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

# re-exported: callers import the variant check from here too
from export.variant_check import (VariantRejectedError, VariantThresholds,  # noqa: F401
                                  check_interface, compare_variant, load_images, sample_paths,
                                  thresholds_dict)
from models.card import INPUT_NAME

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Int8Options:
    """How :func:`quantize_int8` quantises.

    Attributes:
        per_channel: one weight scale per output channel (much better for depthwise convs).
        calibrate_method: ``MinMax``, ``Percentile`` or ``Entropy`` (onnxruntime's names).
        float_head: keep everything after the last convolution float (global pooling, the
            dense layers producing ``embedding`` and ``logits``): the conv trunk holds > 99 %
            of the multiply-adds, the head decides the outputs' resolution.
        exclude_logits: keep (at least) the final classifier producing ``logits`` float.
        batch_size: images per calibration batch.
        reduce_range: int8 weights in the range [-64, 64] (onnxruntime's
            ``reduce_range``; off by default). onnxruntime's u8s8 kernels on x86 CPUs without
            VNNI (AVX2, AVX-512 without VNNI) add pairs of uint8 x int8 products in int16
            (``VPMADDUBSW``), which can saturate with full-range weights; 7-bit weights cannot
            (2 x 255 x 64 < 32,767), so a model checked on one x86 host answers the same on
            every other (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html,
            "When and why do I need to try U8U8?"). It costs accuracy on VNNI hosts, where
            nothing saturates: ``make bench-precision`` on 2026-12-07 (VNNI host), once with 7-bit
            weights (what ``PRECISION_ARGS=--reduce-range`` runs) and once without, gave VGG16
            embedding cosine mean 0.99886 and top-1 agreement 96.7 % with it against 0.99952
            and 99.3 % without, MobileNetV3-Large cosine min 0.757 against 0.882. So the
            default is full range, and the card records the CPU the check ran on
            (:func:`int8_dot_product`); export with ``--int8-reduce-range`` for fleets with
            older CPUs. The test fixture's int8 check gave cosine min 0.45 on one CI host on
            2026-12-02 and 0.95 on this one.
    """

    per_channel: bool = True
    calibrate_method: str = "MinMax"
    float_head: bool = True
    exclude_logits: bool = False
    batch_size: int = 8
    reduce_range: bool = False


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over preprocessed uint8 images, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 8) -> None:
        self.images = images
        self.batch_size = batch_size
        self.rewind()

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{"images": batch}``, or None at the end."""
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start:self._start + self.batch_size]
        self._start += self.batch_size
        return {INPUT_NAME: batch}

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def int8_dot_product() -> str:
    """How this host's CPU multiplies uint8 by int8 in onnxruntime's kernels: ``vnni`` (AVX-512
    VNNI or AVX-VNNI: 32-bit accumulation, no saturation), ``no-vnni`` (an x86 CPU without it:
    16-bit pair sums that full-range weights can saturate), or ``unknown`` (no
    ``/proc/cpuinfo`` flags, e.g. not Linux or not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    if not flags:
        return "unknown"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "no-vnni" if "avx2" in flags or "sse4_1" in flags else "unknown"


def _calibration_reader(images: np.ndarray, batch_size: int):
    """An :class:`ImageCalibrationReader` that also subclasses onnxruntime's base class."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    return Reader(images, batch_size)


def normalisation_prefix(model) -> list[str]:
    """Names of the nodes that compute the first convolution's input from the graph input.

    That is the uint8 -> float cast, the /255 scaling, the mean/std normalisation and the
    shape arithmetic feeding them: they stay float so the input stays uint8 pixels and the
    normalisation stays exact.

    Raises:
        ValueError: the graph has no Conv.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    first_conv = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if first_conv is None:
        raise ValueError("the graph has no Conv node")
    names, stack, seen = [], [first_conv.input[0]], set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        stack.extend(node.input)
    return names


def logits_node(model) -> str | None:
    """Name of the node that produces the ``logits`` output (the classifier Gemm)."""
    return next((n.name for n in model.graph.node if "logits" in n.output), None)


def head_nodes(model) -> list[str]:
    """Names of the nodes after the last convolution: pooling and the dense head.

    They compute ``features``, ``embedding`` and ``logits`` from the last feature map and are
    under 1 % of the multiply-adds of every registered backbone; kept float, the three outputs
    are not re-quantised to 8 bits (one per-tensor uint8 scale over a whole batch's
    embeddings costs low-norm images most of their resolution).
    """
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        return []
    producers = {out: node for node in model.graph.node for out in node.output}
    trunk, stack = set(), [convs[-1]]
    while stack:
        node = stack.pop()
        if id(node) in trunk:
            continue
        trunk.add(id(node))
        stack.extend(producers[i] for i in node.input if i in producers)
    # a ReLU right after the last conv stays with it (fused into QLinearConv's output range)
    consumers = [n for n in model.graph.node if convs[-1].output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type in ("Relu", "Clip"):
        trunk.add(id(consumers[0]))
    return [n.name for n in model.graph.node if id(n) not in trunk]


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, *,
                  options: Int8Options = Int8Options()) -> dict:
    """Static int8 QDQ quantisation of an fp32 model, calibrated on ``calibration`` images.

    Args:
        fp32_path: the fp32 ONNX model (uint8 input, normalisation in the graph).
        out_path: where the int8 model is written.
        calibration: ``(N, S, S, 3)`` uint8 preprocessed training images.

    Returns:
        What was done (JSON-serialisable), for the model card.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # symbolic + ONNX shape inference and onnxruntime's basic graph optimisations (constant
        # folding, ...): onnxruntime's recommended step before quantising
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        # nodes_to_exclude matches names: an unnamed node (e.g. the HardSigmoid/Mul a
        # HardSwish is inlined into) would make "" exclude every unnamed node at once
        for index, node in enumerate(model.graph.node):
            if not node.name:
                node.name = f"_unnamed_{node.op_type}_{index}"
        onnx.save(model, str(prepared))
        excluded = normalisation_prefix(model)
        if options.float_head:
            excluded += head_nodes(model)
        if options.exclude_logits and (name := logits_node(model)) and name not in excluded:
            excluded.append(name)
        quantize_static(
            str(prepared), str(out_path),
            _calibration_reader(calibration, options.batch_size),
            quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, options.calibrate_method),
            nodes_to_exclude=excluded, reduce_range=options.reduce_range,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    check_interface(fp32_path, out_path)
    quantized = onnx.load(str(out_path), load_external_data=False)
    n_q = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": ("int8 per-channel" if options.per_channel else "int8 per-tensor")
            + (", 7-bit range" if options.reduce_range else ""),
            "reduce_range": options.reduce_range,
            # the CPU the variant check runs on (this process): whether its figures would hold
            # on a host whose kernels saturate (see Int8Options.reduce_range)
            "checked_on_int8_dot_product": int8_dot_product(),
            "activations": "uint8 asymmetric", "calibrate_method": options.calibrate_method,
            "calibration_images": int(len(calibration)), "float_head": options.float_head,
            "float_nodes": sorted(n for n in excluded if n),
            "quantize_linear_nodes": n_q}


def convert_fp16(fp32_path: Path, out_path: Path) -> dict:
    """Convert weights and float tensors to float16, keeping uint8 in / float32 out.

    Returns:
        What was done (JSON-serialisable), for the model card.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(out_path))
    onnx.checker.check_model(str(out_path), full_check=True)
    check_interface(fp32_path, out_path)
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True, "intended_providers": ["CUDAExecutionProvider",
                                                          "TensorrtExecutionProvider"]}


def make_variant(precision: str, fp32_path: Path, out_path: Path, *,
                 calibration: np.ndarray | None = None,
                 int8: Int8Options = Int8Options()) -> dict:
    """Derive the ``precision`` variant of ``fp32_path`` into ``out_path``.

    Returns:
        The conversion details for the card.

    Raises:
        ValueError: unknown precision, or int8 without calibration images.
    """
    if precision == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 quantisation needs calibration images")
        return quantize_int8(fp32_path, out_path, calibration, options=int8)
    if precision == "fp16":
        return convert_fp16(fp32_path, out_path)
    raise ValueError(f"unknown precision variant {precision!r}; choose from int8, fp16")
