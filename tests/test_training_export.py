"""Training (checkpoints, resume, modes) and export (ONNX contract, parity, repository)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import last_json_line, run_cli, subset_imagefolder
from export.onnx_export import load_run_checkpoint, model_from_checkpoint
from models.card import ModelCard
from models.repository import (ModelIntegrityError, ModelNotFoundError, list_versions, resolve,
                               verify)
from models.runtime import open_session
from training.config import TrainConfig
from training.trainer import RunDirError, checkpoint_paths, train


@pytest.fixture(scope="module")
def tiny_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder of real photos: 8 train + 4 val per class."""
    return subset_imagefolder(data_dir, tmp_path_factory.mktemp("tiny"),
                              {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})


def small_config(data: Path, **overrides) -> TrainConfig:
    values = dict(data=data, backbone="mobilenet_v3_small", epochs=3, batch_size=4,
                  input_size=64, seed=7)
    return TrainConfig(**(values | overrides))


def test_resume_reproduces_an_uninterrupted_run(tiny_data, tmp_path):
    straight = train(small_config(tiny_data), tmp_path / "straight")
    stopped = train(small_config(tiny_data, epochs=1), tmp_path / "stopped")
    assert len(stopped) == 1
    resumed = train(small_config(tiny_data, epochs=3), tmp_path / "stopped", resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    lines = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert [p.name for p in checkpoint_paths(tmp_path / "stopped")] == [
        "epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    final_a = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_003.pt",
                         weights_only=True)["model_state"]
    final_b = torch.load(tmp_path / "stopped" / "checkpoints" / "epoch_003.pt",
                         weights_only=True)["model_state"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-5)


def test_run_dir_guards(tiny_data, tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(small_config(tiny_data, epochs=1), tmp_path / "empty", resume=True)
    train(small_config(tiny_data, epochs=1), tmp_path / "once")
    with pytest.raises(RunDirError, match="--resume"):
        train(small_config(tiny_data, epochs=1), tmp_path / "once")


def test_feature_extract_trains_only_the_head(tiny_data, tmp_path):
    from models.backbones.registry import build_backbone

    config = small_config(tiny_data, epochs=1, mode="feature-extract", lr=0.05)
    train(config, tmp_path / "fe")
    state = load_run_checkpoint(tmp_path / "fe", "last")
    trained, _ = model_from_checkpoint(state)
    torch.manual_seed(config.seed)  # the trainer's initialisation, reproduced
    initial = build_backbone("mobilenet_v3_small", num_classes=2)
    groups = state["optimizer_state"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 2  # the final Linear's weight and bias
    before, after = initial.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.classifier.3.weight", "net.classifier.3.bias"}


def test_cli_train_export_contract(trained_run, published, data_dir):
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    assert card.backbone == "mobilenet_v3_small" and card.class_names == ["ants", "bees"]
    assert card.weights_source == "random-init"
    assert card.parity is not None and card.parity.n_images == 64
    assert card.parity.embedding_cosine_min > 0.9999 and card.parity.top1_agreement == 1.0
    metrics = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 1 and metrics[0]["seconds"] > 0
    assert card.training["val_acc"] == pytest.approx(metrics[0]["val_acc"])

    model = onnx.load(str(published["path"] / "model.onnx"))
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    dims = inputs["images"].type.tensor_type.shape.dim
    assert inputs["images"].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [224, 224, 3]
    assert [o.name for o in model.graph.output] == ["logits", "embedding", "features"]

    session = open_session(str(published["path"] / "model.onnx"))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    five = session.run(None, {"images": batch})
    one = session.run(None, {"images": batch[2:3]})
    assert [o.shape for o in five] == [(5, 2), (5, 1024), (5, 576)]
    for a, b in zip(five, one):
        np.testing.assert_allclose(a[2:3], b, rtol=1e-4, atol=1e-5)  # dynamic batch


def test_repository_versions_and_integrity(trained_run, published, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(published["repository"], repository)
    name = published["name"]
    proc = run_cli("export", str(trained_run), "--repository", str(repository), "--name", name,
                   "--checkpoint", "last", "--parity-limit", "8")
    assert last_json_line(proc.stdout)["version"] == published["version"] + 1
    assert list_versions(repository, name) == [1, 2]
    assert not [p for p in (repository / name).iterdir() if p.name.startswith(".")]
    assert resolve(repository, name).card.version == 2
    listed = run_cli("models", "list", "--repository", str(repository)).stdout
    assert f"{name}\t1,2" in listed
    run_cli("models", "verify", f"{name}:1", "--repository", str(repository))

    with open(repository / name / "2" / "model.onnx", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify(repository / name / "2")
    with pytest.raises(ModelNotFoundError):
        resolve(repository, name, 9)
    with pytest.raises(ModelNotFoundError):
        resolve(repository, "nope")


def test_bootstrap_builds_default_model_once(data_dir, tmp_path):
    from conftest import base_env

    env = base_env(CNN_CODES_REPOSITORY=str(tmp_path / "repo"), CNN_CODES_SAMPLE_DATA=str(data_dir),
                   CNN_CODES_DEFAULT_BACKBONE="mobilenet_v3_small",
                   CNN_CODES_DEFAULT_EPOCHS="1", CNN_CODES_MODEL_NAME="default")
    run_cli("bootstrap", env=env, cwd=tmp_path)
    card = resolve(tmp_path / "repo", "default").card
    assert card.version == 1 and card.backbone == "mobilenet_v3_small"
    assert (tmp_path / "runs" / "default-mobilenet_v3_small" / "best.pt").is_file()
    run_cli("bootstrap", env=env, cwd=tmp_path)  # already there: builds nothing new
    assert list_versions(tmp_path / "repo", "default") == [1]


def test_export_records_retrieval_figures_and_models_list_shows_them(published):
    """The card carries the exported codes' retrieval quality (val vs train) beside what a
    constant guess and a random ranking score; ``models list`` prints them."""
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    figures = card.retrieval
    assert figures is not None and figures["layer"] == "embedding"
    assert figures["gallery"] > 100 and figures["queries"] > 100
    assert set(figures["knn_accuracy"]) == {"1", "5"}
    assert all(0.0 <= v <= 1.0 for v in figures["knn_accuracy"].values())
    assert 0.0 < figures["map"] <= 1.0 and 0.0 < figures["chance_map"] < 1.0
    assert figures["classes"] == card.class_names
    listed = run_cli("models", "list", "--repository", str(published["repository"])).stdout
    assert f"mAP={figures['map']}" in listed and "knn@1=" in listed
