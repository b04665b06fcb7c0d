"""Fine-tuning features: schedule, class weights, unfreezing, early stopping, exact resume after
a kill, YAML config + CLI overrides, pretrained weights from TORCH_HOME / a file, viz on a run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import yaml
from PIL import Image
from pydantic import ValidationError

import training.trainer as trainer
from conftest import last_json_line, run_cli, subset_imagefolder
from models.backbones.registry import torch_hub_checkpoint_path
from training.config import TrainConfig
from training.trainer import (balanced_class_weights, checkpoint_paths, early_stopping_state,
                              initial_state, lr_factor, select_device, train)

HEAD = {"net.classifier.3.weight", "net.classifier.3.bias"}


@pytest.fixture(scope="module")
def uneven_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos with imbalanced classes: train 8 ants + 4 bees, val 4 + 4."""
    return subset_imagefolder(data_dir, tmp_path_factory.mktemp("uneven"),
                              {"train": {"ants": 8, "bees": 4}, "val": {"ants": 4, "bees": 4}})


def config_for(data: Path, **overrides) -> TrainConfig:
    values = dict(data=data, backbone="mobilenet_v3_small", epochs=3, batch_size=4,
                  input_size=64, seed=3, augment="light")
    return TrainConfig(**(values | overrides))


def test_lr_factor_warmup_then_per_epoch_cosine():
    # 4 steps per epoch, 3 epochs, 2 warm-up steps
    factors = [lr_factor(s, 4, 3, 2, "cosine") for s in range(12)]
    assert factors[:2] == [0.5, 1.0]  # linear ramp (step + 1) / 2
    assert factors[2:4] == [1.0, 1.0]
    assert factors[4:8] == [pytest.approx(0.75)] * 4  # 0.5 (1 + cos(pi / 3))
    assert factors[8:] == [pytest.approx(0.25)] * 4
    # epoch 1 does not depend on the run's length (train k epochs, resume with more)
    assert [lr_factor(s, 4, 1, 2, "cosine") for s in range(4)] == factors[:4]
    assert lr_factor(10, 4, 3, 0, "constant") == 1.0
    assert lr_factor(0, 4, 3, 8, "constant") == 1 / 8


def test_balanced_class_weights_and_early_stopping_rule():
    weights = balanced_class_weights([0] * 8 + [1] * 4, 2)
    torch.testing.assert_close(weights, torch.tensor([12 / 16, 12 / 8]))
    with pytest.raises(ValueError, match=r"\[2\]"):
        balanced_class_weights([0, 1], 3)

    rows = [{"epoch": e, "val_loss": v, "val_acc": a}
            for e, v, a in [(1, 0.70, 0.5), (2, 0.65, 0.6), (3, 0.66, 0.6), (4, 0.649, 0.55)]]
    loss = config_for(Path("."), early_stopping_patience=2, early_stopping_min_delta=0.005)
    state = early_stopping_state(rows, loss)
    assert (state.best, state.best_epoch, state.bad_epochs, state.stop) == (0.65, 2, 2, True)
    acc = config_for(Path("."), early_stopping_patience=3, early_stopping_metric="val_acc")
    state = early_stopping_state(rows, acc)
    assert (state.best, state.best_epoch, state.bad_epochs, state.stop) == (0.6, 2, 2, False)


def test_config_validation_and_device_selection(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("data: /x\nbatch-size: 8\nlr: 0.1\nmode: feature-extract\n")
    config = TrainConfig.from_file(file, lr=0.02, epochs=None, unfreeze_after=4)
    assert (config.batch_size, config.lr, config.epochs, config.unfreeze_after) == (8, 0.02, 5, 4)
    assert config.data == Path("/x")
    with pytest.raises(ValidationError, match="feature-extract"):
        config_for(Path("."), mode="finetune", unfreeze_after=2)
    with pytest.raises(ValidationError):
        config_for(Path("."), warmup_steps=3)  # unknown keys are errors, not ignored
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="cuda"):
            select_device("cuda")


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_killed_run_resumes_exactly_with_unfreezing_warmup_clipping_and_class_weights(
        uneven_data, tmp_path, monkeypatch):
    config = config_for(uneven_data, mode="feature-extract", unfreeze_after=1, lr=0.02,
                        warmup_epochs=0.5, grad_clip_norm=0.5, class_weights="balanced",
                        label_smoothing=0.1, optimizer="sgd", weight_decay=1e-3)
    straight = train(config, tmp_path / "straight")
    assert [r["backbone_frozen"] for r in straight] == [True, False, False]
    assert straight[0]["backbone_lr"] == 0.0 and straight[1]["backbone_lr"] > 0
    assert all(0.0 <= r["dead_units"] <= 1.0 and r["grad_norm"] > 0 for r in straight)

    # The same run, killed during epoch 3 (after the checkpoint of epoch 2), then resumed.
    real_epoch = trainer._train_epoch
    calls = {"n": 0}

    def dies_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(trainer, "_train_epoch", real_epoch)
    assert [p.name for p in checkpoint_paths(tmp_path / "killed")] == [
        "epoch_001.pt", "epoch_002.pt"]
    resumed = train(config, tmp_path / "killed", resume=True)

    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "dead_units", "lr",
                    "backbone_lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    final_a = _state(tmp_path / "straight" / "checkpoints" / "epoch_003.pt")
    final_b = _state(tmp_path / "killed" / "checkpoints" / "epoch_003.pt")
    for key, value in final_a["model_state"].items():
        torch.testing.assert_close(value, final_b["model_state"][key], rtol=1e-5, atol=1e-6)
    moments_a = final_a["optimizer_state"]["state"]
    moments_b = final_b["optimizer_state"]["state"]
    assert moments_a.keys() == moments_b.keys()
    for key in moments_a:
        torch.testing.assert_close(moments_a[key]["momentum_buffer"],
                                   moments_b[key]["momentum_buffer"], rtol=1e-5, atol=1e-6)

    # Epoch 1 trained only the head (frozen BN statistics included); epoch 2 the backbone too.
    init = initial_state(config, 2)
    epoch1 = _state(tmp_path / "straight" / "checkpoints" / "epoch_001.pt")["model_state"]
    epoch2 = _state(tmp_path / "straight" / "checkpoints" / "epoch_002.pt")["model_state"]
    assert {k for k in init if not torch.equal(init[k], epoch1[k])} == HEAD
    assert not torch.equal(epoch1["net.features.0.0.weight"], epoch2["net.features.0.0.weight"])
    assert not torch.equal(epoch1["net.features.0.1.running_mean"],
                           epoch2["net.features.0.1.running_mean"])
    # discriminative rates: the backbone at lr x 0.1 (per-epoch cosine x warm-up ramp)
    assert resumed[1]["backbone_lr"] == pytest.approx(0.1 * resumed[1]["lr"])
    assert resumed[1]["lr"] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi / 3)))


def test_early_stopping_ends_the_run_and_resume_respects_it(uneven_data, tmp_path):
    config = config_for(uneven_data, epochs=6, lr=1e-9, early_stopping_patience=2,
                        early_stopping_min_delta=0.5)
    history = train(config, tmp_path / "run")
    assert [r["epoch"] for r in history] == [1, 2, 3]  # best at 1, no better for 2 epochs
    last = _state(checkpoint_paths(tmp_path / "run")[-1])
    assert last["early_stopping"] == {"best": history[0]["val_loss"], "best_epoch": 1,
                                      "bad_epochs": 2, "stop": True}
    again = train(config_for(uneven_data, epochs=8), tmp_path / "run", resume=True)
    assert len(again) == 3 and len(checkpoint_paths(tmp_path / "run")) == 3


def test_training_starts_from_torch_home_weights_and_local_files(uneven_data, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = torch_hub_checkpoint_path(tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
    assert path.name == "mobilenet_v3_small-047dcff4.pth"  # torchvision's file name
    path.parent.mkdir(parents=True)
    torch.manual_seed(1234)
    reference = tvm.mobilenet_v3_small(weights=None)
    with torch.no_grad():  # unmistakable values, BN statistics included
        for name, buffer in reference.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.5, 0.5)
    ref = reference.state_dict()
    torch.save(ref, path)

    config = config_for(uneven_data, epochs=1, mode="feature-extract", weights="DEFAULT",
                        lr=0.05)
    train(config, tmp_path / "pretrained")
    trained = _state(tmp_path / "pretrained" / "best.pt")
    assert trained["weights"] == "DEFAULT"
    state = trained["model_state"]
    for key, value in ref.items():
        if f"net.{key}" in HEAD or key.endswith("num_batches_tracked"):
            continue
        # the frozen backbone carries exactly the cached file's weights and BN statistics
        torch.testing.assert_close(state[f"net.{key}"], value, rtol=0, atol=0)
    assert state["net.classifier.3.weight"].shape == (2, 1024)  # a new 2-way head

    model = trainer.make_model(config, 2)  # pretrained: the backbone's own BN momentum
    assert model.net.features[0][1].momentum == 0.01

    local = tmp_path / "mine.pth"
    shutil.copy(path, local)
    from_file = initial_state(config_for(uneven_data, weights=str(local)), 2)
    torch.testing.assert_close(from_file["net.features.9.block.3.0.weight"],
                               ref["features.9.block.3.0.weight"], rtol=0, atol=0)


def test_cli_yaml_config_with_overrides_and_viz_of_the_run(uneven_data, tmp_path):
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump({
        "backbone": "mobilenet_v3_small", "epochs": 2, "batch-size": 4, "input_size": 64,
        "lr": 0.5, "augment": "heavy", "warmup_epochs": 0.5, "seed": 11}))
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--config", str(config_file), "--data", str(uneven_data),
                   "--lr", "0.004", "--early-stopping-patience", "5", "--out", str(run_dir))
    result = last_json_line(proc.stdout)
    assert result["epochs"] == 2 and 0 <= result["best_val_acc"] <= 1
    saved = TrainConfig.model_validate_json((run_dir / "config.json").read_text())
    assert saved.lr == 0.004                               # the flag wins over the file
    assert saved.augment == "heavy" and saved.batch_size == 4 and saved.seed == 11  # file
    assert saved.early_stopping_patience == 5 and saved.optimizer == "adamw"     # default
    assert TrainConfig(**yaml.safe_load((run_dir / "config.yaml").read_text())) == saved
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("dead_units" in r for r in rows)

    out = run_cli("viz", "curves", str(run_dir), "--labels", "yaml run").stdout
    assert json.loads(out.strip().splitlines()[-1])["png"] == str(run_dir / "curves.png")
    from diagnostics import viz

    viz.filters(run_dir, run_dir / "filters_rgb.png")
    viz.filters(run_dir, run_dir / "filters_gray.png", mode="gray", checkpoint="last")
    viz.weights(run_dir, run_dir / "weights.png", max_layers=4)
    for name in ("curves.png", "filters_rgb.png", "filters_gray.png", "weights.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
