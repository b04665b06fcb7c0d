"""Pictures of CNN codes and of what the convnet learned (issue 15), on the real photos.

``cnn-codes viz codes|neighbours|activations|gradcam`` run through the CLI on the real photos,
with the session's briefly trained model and what the search tests build from it (conftest's
``trained_run``, ``published``: one epoch of mobilenet_v3_small; ``embedded``, ``index``: the
val and train photos embedded, an exact index of both). Each test checks the PNG itself
(pixel size, not blank) and the number of panels the figure should have (reported by the
command from the figure's own axes). Grad-CAM is also checked against its definition and,
for a global-pool + Linear head, against CAM (Zhou et al., 2016), which Grad-CAM reduces to
there (Selvaraju et al., 2017, section 3.1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnn_codes import cli
from conftest import CLI, REPO_ROOT, base_env, last_json_line, run_cli
from diagnostics.convnet import (TORCH_CHECKPOINT_FILENAME, capture_activations,
                                 default_layers, grad_cam)
from models.backbones.registry import build_backbone, list_backbones

MIN_STD = 20.0  # pixel standard deviation (0-255) of a PNG that shows something


def png_stats(path: Path) -> tuple[tuple[int, int], float]:
    """``((width, height), pixel std over RGB)`` of a PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        return image.size, float(pixels.std())


def check_png(result: dict) -> None:
    """The PNG exists, has the pixel size the command reported, and is not blank."""
    size, std = png_stats(Path(result["png"]))
    assert size == (result["width_px"], result["height_px"])
    assert min(size) >= 300
    assert std > MIN_STD, f"{result['png']} looks blank (pixel std {std:.1f})"


def cli_status(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cnn-codes ARGS`` whatever its exit status."""
    return subprocess.run([*CLI, *args], env=base_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def query_photos(data_dir: Path) -> list[Path]:
    """One ant and one bee of the val photos (all of them are indexed)."""
    return [sorted((data_dir / "val" / cls).glob("*.jpg"))[0] for cls in ("ants", "bees")]


def val_labels(data_dir: Path) -> dict[str, int]:
    """Photos per parent folder among the files ``cnn-codes embed`` took from val/."""
    from collections import Counter

    from batch.sources import list_inputs

    return dict(Counter(Path(p).parent.name for p in list_inputs([str(data_dir / "val")])))


def test_viz_codes_map_with_thumbnails(embedded, data_dir, tmp_path):
    out = tmp_path / "map.png"
    proc = run_cli("viz", "codes", str(embedded["val"]), "--out", str(out), "--thumbnails",
                   "--repository", str(embedded["repository"]))
    result = last_json_line(proc.stdout)
    assert result["figure"] == "codes" and result["png"] == str(out)
    check_png(result)
    assert (result["width_px"], result["height_px"]) == (900, 800)
    assert result["panels"] == 1 and (result["rows"], result["columns"]) == (1, 1)
    labels = val_labels(data_dir)
    assert set(labels) == {"ants", "bees"}
    assert result["labels"] == labels  # the parent folders
    assert result["points"] == result["total"] == sum(labels.values())
    assert result["thumbnails"] == result["points"]
    assert 0 < result["perplexity"] < result["points"]


def test_viz_codes_is_deterministic_and_needs_enough_codes(embedded, tmp_path):
    from diagnostics.codes import read_codes, tsne_2d

    codes = read_codes([embedded["val"]], max_points=30, seed=1)
    assert codes.vectors.shape == (30, 1024) and codes.vectors.dtype == np.float32
    assert codes.total > 30 and len(codes.paths) == len(codes.labels) == 30
    np.testing.assert_allclose(np.linalg.norm(codes.vectors, axis=1), 1.0, atol=1e-5)
    first, perplexity = tsne_2d(codes.vectors, seed=3)
    again, _ = tsne_2d(codes.vectors, seed=3)
    assert first.shape == (30, 2) and first.dtype == np.float32
    assert perplexity == pytest.approx(29 / 3)
    np.testing.assert_allclose(first, again)
    with pytest.raises(ValueError, match="at least"):
        tsne_2d(codes.vectors[:3])
    with pytest.raises(ValueError, match="perplexity"):
        tsne_2d(codes.vectors, perplexity=100)


def test_viz_neighbours_grid_matches_index_query(index, embedded, data_dir, tmp_path):
    queries = query_photos(data_dir)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    out = tmp_path / "grid.png"
    k = 3
    proc = run_cli("viz", "neighbours", str(index["dir"]), *map(str, queries), str(junk),
                   "-k", str(k), "--out", str(out), "--repository", str(embedded["repository"]))
    result = last_json_line(proc.stdout)
    check_png(result)
    assert (result["rows"], result["columns"]) == (3, 1 + k)
    # two usable queries with k neighbours each, and the junk row's one cell with its error
    assert result["panels"] == 2 * (1 + k) + 1
    good, bad = result["results"][:2], result["results"][2]
    for query, item in zip(queries, good):
        assert item["error"] is None and len(item["neighbors"]) == k
        assert item["neighbors"][0]["path"] == str(query.resolve())  # itself first
        assert item["neighbors"][0]["score"] >= 0.999
    assert bad["neighbors"] is None and bad["error"]["code"] == "not_an_image"

    # the same query path as `cnn-codes index query`: the same neighbours and scores
    answer = last_json_line(run_cli("index", "query", str(index["dir"]),
                                    *map(str, queries), "-k", str(k), "--repository",
                                    str(embedded["repository"])).stdout)
    assert [r["neighbors"] for r in answer["results"]] == [r["neighbors"] for r in good]


def test_viz_activations_of_a_run(trained_run, data_dir, tmp_path, capsys):
    image = query_photos(data_dir)[0]
    out = tmp_path / "act.png"
    result = last_json_line(run_cli("viz", "activations", str(trained_run), str(image),
                                    "--out", str(out)).stdout)
    check_png(result)
    model = build_backbone("mobilenet_v3_small", num_classes=2)
    layers = default_layers(model)
    assert layers == ["net.features.0.0", "net.features.6", "net.features.12"]
    assert [x["layer"] for x in result["layers"]] == layers
    assert result["panels"] == 1 + len(layers) and result["columns"] == 1 + len(layers)
    assert result["layers"][0]["shape"] == [16, 112, 112]   # first conv, stride 2 at 224 px
    assert result["layers"][-1]["shape"] == [576, 7, 7]     # last conv block
    assert result["source"]["kind"] == "run"
    assert result["source"]["checkpoint"] == str(trained_run / "best.pt")
    assert str(trained_run) in result["source"]["description"]

    # chosen layers, with or without the "net." prefix (in-process: the same main)
    assert cli.main(["viz", "activations", str(trained_run), str(image), "--layers",
                     "features.1", "net.features.3", "--max-channels", "4",
                     "--out", str(out)]) == 0
    result = last_json_line(capsys.readouterr().out)
    check_png(result)
    assert result["panels"] == 3
    assert [len(x["channels"]) for x in result["layers"]] == [4, 4]


def test_viz_gradcam_of_a_run(trained_run, data_dir, tmp_path, capsys):
    image = query_photos(data_dir)[1]
    out = tmp_path / "cam.png"
    result = last_json_line(run_cli("viz", "gradcam", str(trained_run), str(image),
                                    "--out", str(out)).stdout)
    check_png(result)
    assert result["panels"] == 3 and (result["rows"], result["columns"]) == (1, 3)
    assert result["predicted"] == result["explained"]
    assert result["predicted"] in ("ants", "bees")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["fmap_shape"] == [576, 7, 7] and result["source"]["kind"] == "run"
    other = "bees" if result["predicted"] == "ants" else "ants"
    assert cli.main(["viz", "gradcam", str(trained_run), str(image), "--class", other,
                     "--out", str(out)]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["explained"] == other and result["panels"] == 3


def test_viz_reads_a_published_version_only_with_its_checkpoint(trained_run, published,
                                                                  data_dir, tmp_path, capsys):
    image = str(query_photos(data_dir)[0])
    model = f"{published['name']}:{published['version']}"
    # export publishes ONNX only: the command says so and names the run to pass instead
    status = cli.main(["viz", "gradcam", model, image, "--out", str(tmp_path / "x.png"),
                       "--repository", str(published["repository"])])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "no torch checkpoint" in err and "pass the training run folder" in err
    assert str(trained_run.resolve()) in err
    assert not (tmp_path / "x.png").exists()

    # a version with the run's checkpoint beside its ONNX file is read as the model
    repository = tmp_path / "repo"
    shutil.copytree(published["repository"], repository)
    version_dir = repository / published["name"] / str(published["version"])
    shutil.copy(trained_run / "best.pt", version_dir / TORCH_CHECKPOINT_FILENAME)
    out = tmp_path / "cam.png"
    assert cli.main(["viz", "gradcam", model, image, "--out", str(out),
                     "--repository", str(repository)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_png(result)
    assert result["source"]["kind"] == "model" and result["panels"] == 3
    assert result["source"]["description"].startswith(f"model {model} ")
    assert cli.main(["viz", "activations", str(version_dir), image, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"]["kind"] \
        == "model"


def test_viz_bad_input_is_one_line_and_exit_2(trained_run, data_dir, tmp_path, capsys):
    image = str(query_photos(data_dir)[0])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"GIF89a nope")
    out = str(tmp_path / "x.png")
    cases = [
        (["viz", "codes", str(data_dir), "--out", out], "not a cnn-codes embed output"),
        (["viz", "neighbours", str(data_dir), image, "--out", out], "manifest"),
        (["viz", "activations", str(trained_run), image, "--layers", "features.99",
          "--out", out], "no layer 'features.99'"),
        (["viz", "activations", str(trained_run), image, "--layers", "net.classifier.0",
          "--out", out], "not a (N, C, h, w) feature map"),
        (["viz", "gradcam", str(trained_run), str(junk), "--out", out], "truncated"),
        (["viz", "gradcam", str(trained_run), image, "--class", "wasps", "--out", out],
         "classes: ['ants', 'bees']"),
        (["viz", "gradcam", str(tmp_path / "no" / "run"), image, "--out", out],
         "neither a training run folder"),
        (["viz", "gradcam", str(data_dir), image, "--out", out], "best.pt does not exist"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (argv, err)
        assert err.startswith(f"cnn-codes viz {argv[1]}: ")
    assert not Path(out).exists()
    # the command itself: exit 2, no traceback, the message is the last line on stderr
    proc = cli_status("viz", "gradcam", str(trained_run), str(junk), "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("cnn-codes viz gradcam: cannot use")


@pytest.mark.parametrize("name", [info.name for info in list_backbones()])
def test_gradcam_and_default_layers_for_every_backbone(name):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    cam = grad_cam(model, x)
    with torch.no_grad():
        logits = model(x).logits[0]
    assert cam.class_index == int(logits.argmax())
    assert cam.heatmap.shape == (64, 64) and cam.heatmap.dtype == np.float32
    assert cam.heatmap.min() >= 0 and cam.heatmap.max() <= 1
    assert cam.coarse.shape == cam.fmap_shape[1:] and cam.fmap_shape[0] == model.info.features_dim
    np.testing.assert_allclose(cam.probabilities, torch.softmax(logits, 0).numpy(), rtol=1e-5)
    maps = capture_activations(model, x, default_layers(model))
    assert len(maps) == 3 and all(m.ndim == 3 for m in maps.values())
    assert list(maps.values())[-1].shape[0] == model.info.features_dim  # last block = features


def test_gradcam_is_cam_for_a_global_pool_linear_head():
    """MobileNetV2: logits = W pool(A) + b, so dy_c/dA_k = W_ck / (h w) and Grad-CAM is
    ReLU(sum_k W_ck A_k) / (h w), the class activation map of Zhou et al. (2016)."""
    torch.manual_seed(1)
    model = build_backbone("mobilenet_v2", num_classes=4)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        fmap = model.forward_features(x)[0]
    for c in range(4):
        cam = grad_cam(model, x, class_index=c)
        w = model.classifier_layer.weight[c].detach()
        expected = torch.relu(torch.einsum("k,khw->hw", w, fmap)) / (fmap.shape[1] * fmap.shape[2])
        np.testing.assert_allclose(cam.coarse, expected.numpy(), rtol=1e-4, atol=1e-9)
        assert cam.class_index == c
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, x, class_index=4)
