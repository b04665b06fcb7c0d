"""Backbone registry: declared dims (contract), taps, weights loading, preprocessing spec."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from models.backbones.registry import (WeightsNotFoundError, build_backbone, get_backbone_info,
                             list_backbones, torch_hub_checkpoint_path)

REQUIRED = {"vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "alexnet", "efficientnet_b0"}


def test_registry_has_required_backbones():
    assert REQUIRED <= {info.name for info in list_backbones()}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_contract_declared_dims_on_small_input(name):
    info = get_backbone_info(name)
    model = build_backbone(name, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        fmap = model.forward_features(x)
        pre_logits = model.forward_head(fmap, pre_logits=True)
        logits = model.forward_head(fmap)
    assert out.logits.shape == (2, 3)
    assert out.embedding.shape == (2, info.embedding_dim)
    assert out.features.shape == (2, info.features_dim)
    assert fmap.shape[1] == info.features_dim
    # one forward pass and the timm-style taps agree
    torch.testing.assert_close(out.embedding, pre_logits)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.features, fmap.mean(dim=(2, 3)))


def test_logits_are_a_linear_map_of_the_embedding():
    model = build_backbone("mobilenet_v3_small", num_classes=4)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
        head = model.classifier_layer
        torch.testing.assert_close(out.logits, out.embedding @ head.weight.T + head.bias)


def test_preprocessing_comes_from_torchvision_weights():
    info = get_backbone_info("mobilenet_v3_large")
    preset = tvm.MobileNet_V3_Large_Weights.DEFAULT.transforms()
    spec = info.preprocessing
    assert (spec.resize_size, spec.crop_size) == (preset.resize_size[0], preset.crop_size[0])
    assert list(spec.mean) == list(preset.mean) and list(spec.std) == list(preset.std)
    assert spec.interpolation == preset.interpolation.value
    assert get_backbone_info("vgg16").preprocessing.resize_size == 256


def test_enum_weights_load_from_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    path = torch_hub_checkpoint_path(enum)
    assert path == tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    path.parent.mkdir(parents=True)
    reference = tvm.mobilenet_v3_small(weights=None)
    torch.save(reference.state_dict(), path)

    model = build_backbone("mobilenet_v3_small", weights="DEFAULT")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[key], value)
    assert model.num_classes == 1000
    # with a new head, the backbone keeps the weights and only the last Linear is new
    two = build_backbone("mobilenet_v3_small", weights="IMAGENET1K_V1", num_classes=2)
    torch.testing.assert_close(two.net.features[0][0].weight, reference.features[0][0].weight)
    assert two.num_classes == 2


def test_missing_enum_weights_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("vgg11", weights="IMAGENET1K_V1")
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg11-8a719046.pth") in message
    assert "--weights /path/to/file.pth" in message


def test_local_checkpoint_path_and_head_size_detection(tmp_path):
    source = tvm.mobilenet_v2(weights=None, num_classes=7)
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("mobilenet_v2", weights=str(path))
    assert model.num_classes == 7
    torch.testing.assert_close(model.net.classifier[1].weight, source.classifier[1].weight)
    with pytest.raises(WeightsNotFoundError):
        build_backbone("mobilenet_v2", weights=str(tmp_path / "absent.pth"))


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="known"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_backbone("vgg16", weights="IMAGENET22K")
