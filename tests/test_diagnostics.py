"""Diagnostics: layer summary (shapes, parameters, MACs), dead units, filter tiles, plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from conftest import run_cli
from diagnostics.plots import filter_tiles, first_conv, select_weight_layers
from diagnostics.summary import conv_output_size, forward_shapes, summarize
from models.backbones.registry import build_backbone, get_backbone_info, list_backbones
from training.data import PRESETS, augmentation_samples, image_folders
from training.dead_units import DeadUnitTracker, dead_unit_fraction
from training.trainer import evaluate

BACKBONES = [info.name for info in list_backbones()]


@pytest.fixture(scope="module")
def photos(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder of real photos: 3 train + 4 val per class."""
    root = tmp_path_factory.mktemp("photos")
    for split, count in (("train", 3), ("val", 4)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for path in sorted((data_dir / split / cls).glob("*.jpg"))[:count]:
                shutil.copy(path, root / split / cls / path.name)
    return root


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "dilation", "expected"), [
    (227, 11, 4, 0, 1, 55),   # AlexNet conv1, the CS231n example: (227 - 11 + 0) / 4 + 1
    (224, 3, 2, 1, 1, 112),   # MobileNet stem
    (224, 3, 1, 1, 1, 224),   # VGG "same" 3x3
    (7, 3, 2, 0, 1, 3),
    (97, 5, 2, 2, 1, 49),     # floor((97 - 5 + 4) / 2) + 1
    (32, 3, 1, 2, 2, 32),     # dilated: effective window 5
])
def test_conv_output_size_formula(size, kernel, stride, padding, dilation, expected):
    assert conv_output_size(size, kernel, stride, padding, dilation) == expected
    conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == expected


@pytest.mark.parametrize("size", [5, 6, 7, 112, 113])
def test_pool_output_size_with_ceil_mode_matches_torch(size):
    for kernel, stride, padding in ((2, 2, 0), (3, 2, 0), (3, 2, 1)):
        for ceil in (False, True):
            pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
            measured = pool(torch.zeros(1, 1, size, size)).shape[-1]
            assert conv_output_size(size, kernel, stride, padding, 1, ceil) == measured


@pytest.mark.parametrize("name", BACKBONES)
def test_summary_matches_a_real_forward_pass_and_torchvision(name):
    torch.manual_seed(0)
    model = build_backbone(name)  # 1000 classes, as torchvision's published figures
    info = get_backbone_info(name)
    sizes = (64, 97) if name in ("vgg11", "mobilenet_v3_small", "mobilenet_v2") else (64,)
    for size in sizes:  # 97: odd sides exercise the floor in (W - F + 2P) / S + 1
        summary = summarize(model, size)
        computed = {r.name: r.output_shape for r in summary.rows if r.name != "flatten"}
        assert computed == forward_shapes(model, size), size
    flatten = next(r for r in summary.rows if r.name == "flatten")
    pooled_cells = {"vgg": 49, "alexnet": 36}.get(info.family, 1)  # 7x7, 6x6, global pool
    assert flatten.output_shape[0] == info.features_dim * pooled_cells
    assert summary.rows[-1].type == "Linear" and summary.rows[-1].output_shape == (1000,)

    meta = info.weights_enum.DEFAULT.meta
    summary = summarize(model, 224)
    assert summary.total_params == meta["num_params"]  # torchvision's published count
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert summary.trainable_params == summary.total_params
    # torchvision's "_ops" (GFLOPS in its docs) are multiply-accumulates at 224, 3 decimals
    assert summary.macs / 1e9 == pytest.approx(meta["_ops"], abs=6e-4)


def test_summary_trainable_column_and_cli(tmp_path):
    model = build_backbone("mobilenet_v3_small", num_classes=2)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.classifier_layer.parameters():
        p.requires_grad = True
    summary = summarize(model, 64)
    assert summary.trainable_params == 1024 * 2 + 2
    assert {r.trainable for r in summary.rows if r.type == "Conv2d"} == {"no"}
    assert summary.rows[-1].trainable == "yes"
    text = summary.to_text()
    assert "net.features.0.0 (Conv2d)" in text and "(None, 16, 32, 32)" in text
    assert "Total params: 1,519,906" in text and "Trainable params: 2,050" in text

    out = run_cli("summary", "mobilenet_v3_small", "--input-size", "64", "--num-classes", "2",
                  "--mode", "feature-extract", "--json").stdout
    table = json.loads(out)
    assert table["total_params"] == 1_519_906 and table["trainable_params"] == 2050
    assert table["macs"] == summary.macs
    assert table["rows"][0]["output_shape"] == [16, 32, 32]


def test_dead_unit_tracker_on_constructed_activations():
    batch1 = torch.tensor([[0.0, 1.0, -0.5, 0.0], [0.0, 0.0, -0.1, 2.0]])
    batch2 = torch.tensor([[0.0, 0.0, -3.0, 0.0]])
    tracker = DeadUnitTracker()
    tracker.update(batch1)
    tracker.update(batch2)
    assert tracker.dead_mask.tolist() == [True, False, True, False]
    assert tracker.fraction == 0.5
    tracker.update(torch.tensor([[1e-6, 0.0, 0.0, 0.0]]))  # unit 0 fires once: alive
    assert tracker.fraction == 0.25
    assert dead_unit_fraction(torch.zeros(3, 8)) == 1.0
    fmap = torch.zeros(2, 4, 3, 3)
    fmap[1, 2, 0, 1] = 0.5  # channel 2 fires at one position of one image
    assert dead_unit_fraction(fmap) == 0.75
    with pytest.raises(ValueError):
        tracker.update(torch.zeros(1, 5))
    with pytest.raises(RuntimeError):
        _ = DeadUnitTracker().fraction


def _kill_units(model: nn.Module, name: str, dead: int, dormant: int) -> int:
    """Force the embedding: ``dead`` units at 0, ``dormant`` units negative, the rest > 0."""
    with torch.no_grad():
        if name == "mobilenet_v3_small":  # embedding = hardswish(Linear(pooled))
            linear = model.net.classifier[0]
            linear.weight.zero_()
            linear.bias.fill_(1.0)            # hardswish(1) = 2/3 > 0: alive
            linear.bias[:dead] = -5.0         # hardswish(-5) = 0: dead
            linear.bias[dead:dead + dormant] = -1.0  # hardswish(-1) = -1/3 < 0: never fires
            return linear.out_features
        bn = model.net.features[-1][1]    # mobilenet_v2: pool(relu6(bn(conv(x))))
        bn.weight.zero_()
        bn.bias.fill_(1.0)
        bn.bias[:dead + dormant] = -1.0   # relu6(-1) = 0 everywhere: pooled 0, dead
        return bn.num_features


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_dead_unit_fraction_on_a_constructed_model_and_real_photos(name, photos):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=2)
    units = _kill_units(model, name, dead=100, dormant=28)
    spec = get_backbone_info(name).preprocessing.with_crop_size(64)
    _, val = image_folders(photos, spec, "none")
    metrics = evaluate(model, DataLoader(val, batch_size=3))
    assert metrics["dead_units"] == pytest.approx(128 / units)
    assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["val_loss"] > 0


def test_filter_tiles_are_the_min_max_scaled_kernels():
    torch.manual_seed(0)
    model = build_backbone("mobilenet_v3_small", num_classes=2)
    name, conv = first_conv(model)
    assert name == "net.features.0.0" and conv.weight.shape == (16, 3, 3, 3)
    rgb = filter_tiles(conv.weight, "rgb")
    assert rgb.shape == (16, 3, 3, 3)  # (filter, kh, kw, RGB)
    w = conv.weight.detach().numpy()[5]
    expected = (w - w.min()) / (w.max() - w.min())
    np.testing.assert_allclose(rgb[5], expected.transpose(1, 2, 0), rtol=1e-5, atol=1e-6)
    gray = filter_tiles(conv.weight, "gray")
    lum = np.tensordot([0.299, 0.587, 0.114], w, axes=([0], [0]))
    np.testing.assert_allclose(gray[5], (lum - lum.min()) / (lum.max() - lum.min()),
                               rtol=1e-5, atol=1e-6)
    assert gray.min() == 0.0 and gray.max() == 1.0
    with pytest.raises(ValueError, match="3 input channels"):
        filter_tiles(torch.zeros(4, 1, 3, 3), "rgb")
    assert filter_tiles(torch.randn(4, 1, 5, 5), "gray").shape == (4, 5, 5)


def test_select_weight_layers_spacing():
    state = build_backbone("mobilenet_v3_small", num_classes=2).net.state_dict()
    keys = select_weight_layers(state, max_layers=5)
    assert len(keys) == 5 and keys[0] == "features.0.0.weight"
    assert keys[-1] == "classifier.3.weight"
    assert select_weight_layers(state, pattern=r"^classifier") == [
        "classifier.0.weight", "classifier.3.weight"]
    with pytest.raises(ValueError):
        select_weight_layers(state, pattern="nope")


def test_augmentation_samples_are_reproducible_and_vary(photos):
    spec = get_backbone_info("mobilenet_v3_small").preprocessing.with_crop_size(64)
    rows = augmentation_samples(photos, spec, ["none", "heavy"], n_images=2, n_samples=3)
    assert len(rows) == 4 and PRESETS == ("none", "light", "standard", "heavy")
    assert [r[0].split("\n")[0] for r in rows] == ["ants", "ants", "bees", "bees"]
    for label, view, samples in rows:
        assert view.shape == (64, 64, 3) and view.dtype == np.uint8
        assert len(samples) == 3 and all(s.shape == (3, 64, 64) for s in samples)
    none, heavy = rows[0][2], rows[1][2]
    torch.testing.assert_close(none[0], none[1])   # no randomness in "none"
    assert not torch.allclose(heavy[0], heavy[1])  # heavy draws differ
    again = augmentation_samples(photos, spec, ["heavy"], n_images=1, n_samples=3)
    for a, b in zip(again[0][2], heavy):
        torch.testing.assert_close(a, b)           # same seed, same draws


def test_viz_augment_cli_writes_a_png(photos, tmp_path):
    out = tmp_path / "augment.png"
    proc = run_cli("viz", "augment", "--data", str(photos), "--input-size", "64",
                   "--preset", "light", "--preset", "heavy", "--images", "2", "--samples", "3",
                   "--out", str(out))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["png"] == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
