"""Fast tests of the ``cnn-codes`` parser: subcommand modules, help, generated train flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_codes import cli
from cnn_codes.commands import COMMANDS, embed, serve, train
from cnn_codes.commands.model_flags import docstring_attributes, flag_name, given_values
from cnn_codes.settings import Settings
from training.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["backbones", "train", "summary", "viz", "export", "models", "bootstrap", "embed",
               "index", "dedup", "eval", "serve"]
HELP_ARGVS = [[], *[[name] for name in SUBCOMMANDS],
              *[["viz", figure] for figure in ("curves", "filters", "weights", "augment",
                                               "codes", "neighbours", "activations",
                                               "gradcam")],
              ["index", "build"], ["index", "query"], ["eval", "retrieval"]]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _train_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", "--out", "run", *argv])


def test_subcommands_in_order() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == SUBCOMMANDS
    for module in COMMANDS:
        assert callable(module.add_parser) and callable(module.run) and module.run.__doc__


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=lambda a: " ".join(a) or "top")
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: cnn-codes")


def test_module_entry_point_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "cnn_codes.cli", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "{" + ",".join(SUBCOMMANDS) + "}" in proc.stdout


def test_every_train_config_field_has_a_flag() -> None:
    actions = {a.dest: a for a in _subparser("train")._actions}
    described = docstring_attributes(TrainConfig)
    for name in TrainConfig.model_fields:
        assert flag_name(name) in actions[name].option_strings, name
        assert actions[name].default is None, name  # None = not given, the file/defaults win
        assert described.get(name), f"TrainConfig docstring does not describe {name}"
        assert actions[name].help.startswith(described[name].replace("``", "")[:20]), name
    # the command's own flags, not TrainConfig fields
    for flag in ("--config", "--out", "--resume"):
        assert any(flag in a.option_strings for a in actions.values()), flag


def test_train_help_shows_descriptions_and_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _subparser("train").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precise-bn-batches PRECISE_BN_BATCHES" in text
    assert "(default: 32)" in text and "(default: mobilenet_v3_large)" in text
    assert "--amp, --no-amp" in text and "(default: on)" in text


def test_flags_parse_into_train_config(tmp_path: Path) -> None:
    args = _train_args("--data", str(tmp_path), "--lr", "0.004", "--mode", "feature-extract",
                       "--unfreeze-after", "2", "--no-amp", "--deterministic",
                       "--batch-size", "4", "--warmup-epochs", "0.5", "--grad-clip-norm", "1",
                       "--weights", "none", "--precise-bn-batches", "0")
    config = train.resolve_config(args)
    assert config.data == tmp_path and config.lr == 0.004 and config.mode == "feature-extract"
    assert config.unfreeze_after == 2 and config.amp is False and config.deterministic is True
    assert config.batch_size == 4 and config.warmup_epochs == 0.5
    assert config.grad_clip_norm == 1.0 and config.weights == "none"
    assert config.precise_bn_batches == 0
    assert config.epochs == TrainConfig.model_fields["epochs"].default  # not given: default


def test_every_default_round_trips_through_its_flag() -> None:
    argv: list[str] = ["--data", "d"]
    for name, field in TrainConfig.model_fields.items():
        if field.is_required() or field.default is None:
            continue
        if isinstance(field.default, bool):
            argv.append(flag_name(name) if field.default else "--no-" + flag_name(name)[2:])
        else:
            argv += [flag_name(name), str(field.default)]
    args = _train_args(*argv)
    given = given_values(args, TrainConfig)
    assert given == {**TrainConfig(data=Path("d")).model_dump(exclude_none=True)}


def test_config_file_then_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "base.yaml"
    config_file.write_text(f"data: {tmp_path}\nlr: 0.1\nbatch-size: 4\n")
    config = train.resolve_config(_train_args("--config", str(config_file), "--lr", "0.2"))
    assert config.lr == 0.2 and config.batch_size == 4 and config.data == tmp_path


def test_resume_needs_no_data() -> None:
    assert train.resolve_config(_train_args("--resume")).data == Path(".")


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--lr", "0"], ["--momentum", "1"],
                                  ["--epochs", "x"], ["--mode", "frozen"], []],
                         ids=lambda a: " ".join(a) or "no --out")
def test_invalid_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    out = [] if not argv else ["--out", "run"]
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["train", *out, *argv])
    assert exited.value.code == 2
    assert "cnn-codes train: error:" in capsys.readouterr().err


def test_batch_size_message_kept(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _train_args("--batch-size", "0")
    assert "argument --batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_train_without_the_train_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving-only install (no PyYAML): other subcommands parse, train refuses cleanly."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    monkeypatch.delitem(sys.modules, "training.config", raising=False)
    assert cli.build_parser().parse_args(["serve", "--port", "1"]).port == 1
    args = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    with pytest.raises(SystemExit, match=r"cnn-codes\[train\]"):
        args.func(args, Settings())


def test_embed_job_options_use_settings_limits() -> None:
    args = cli.build_parser().parse_args(["embed", "imgs", "--out", "o", "--batch-size", "3"])
    settings = Settings(max_image_pixels=1000, min_image_side=9, max_file_bytes=12345)
    options = embed.job_options(args, settings)
    assert options.batch_size == 3 and options.engine == "local" and options.progress
    assert (options.limits.max_pixels, options.limits.min_side,
            options.limits.max_file_bytes) == (1000, 9, 12345)


def test_serve_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    args = cli.build_parser().parse_args(["serve", "--model", "cats:3", "--repository",
                                          str(tmp_path), "--host", "0.0.0.0"])
    env = serve.service_env(args, Settings())
    assert env["CNN_CODES_MODEL_NAME"] == "cats" and env["CNN_CODES_MODEL_VERSION"] == "3"
    assert env["CNN_CODES_REPOSITORY"] == str(tmp_path.resolve())
    assert env["CNN_CODES_HOST"] == "0.0.0.0" and env["BENTOML_HOME"] == str(tmp_path)
    assert env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
