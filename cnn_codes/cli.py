"""The ``cnn-codes`` command: backbones, train, export, models, bootstrap, embed, serve.

Heavy imports (torch, onnx, bentoml) happen inside each subcommand, so ``cnn-codes --help`` is
fast and ``serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from cnn_codes.settings import Settings, apply_offline_env

logger = logging.getLogger("cnn_codes")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _cmd_backbones(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry import list_backbones

    rows = [(i.name, i.family, str(i.embedding_dim), str(i.features_dim),
             str(i.default_input_size), i.embedding_layer) for i in list_backbones()]
    if args.json:
        keys = ("name", "family", "embedding_dim", "features_dim", "input_size", "embedding_layer")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
        return 0
    header = ("backbone", "family", "embedding D", "features C", "input", "embedding layer")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


_TRAIN_FIELDS = (
    "data", "backbone", "weights", "mode", "unfreeze_after", "epochs", "batch_size",
    "optimizer", "lr", "backbone_lr_mult", "momentum", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "class_weights", "grad_clip_norm",
    "early_stopping_patience", "early_stopping_metric", "early_stopping_min_delta", "augment",
    "input_size", "bn_momentum", "precise_bn_batches", "seed", "device", "amp",
    "deterministic", "num_workers",
)


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Defaults < ``--config FILE`` (YAML/JSON) < flags given on the command line."""
    from training.config import TrainConfig, load_config_file
    from training.trainer import train

    overrides = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    from_file = load_config_file(args.config) if args.config else {}
    if args.resume and "data" not in overrides and "data" not in from_file:
        overrides["data"] = Path(".")  # replaced by the run's saved config
    config = TrainConfig(**(from_file | overrides))
    history = train(config, args.out, resume=args.resume)
    last = history[-1]
    print(json.dumps({"run_dir": str(args.out), "epochs": len(history),
                      "best_val_acc": max(r["val_acc"] for r in history), **last}))
    return 0


def _cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    """Keras-style per-layer table of a backbone (analytic output shapes, params, MACs)."""
    from diagnostics.summary import summarize
    from models.registry import build_backbone, get_backbone_info

    info = get_backbone_info(args.backbone)
    model = build_backbone(args.backbone, num_classes=args.num_classes)
    if args.mode == "feature-extract":  # what training freezes: all but the final Linear
        head = {id(p) for p in model.classifier_layer.parameters()}
        for param in model.parameters():
            param.requires_grad = id(param) in head
    summary = summarize(model, args.input_size or info.default_input_size)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return 0


def _cmd_viz(args: argparse.Namespace, settings: Settings) -> int:
    """Diagnostic PNGs: learning curves, first-layer filters, weight histograms, augmentation."""
    from diagnostics import viz

    if args.figure == "curves":
        out = args.out or args.run_dirs[0] / "curves.png"
        labels = args.labels.split(",") if args.labels else None
        path = viz.curves(args.run_dirs, out, labels, title=args.title)
    elif args.figure == "filters":
        out = args.out or args.run_dir / f"filters_{args.mode}.png"
        path = viz.filters(args.run_dir, out, checkpoint=args.checkpoint, mode=args.mode)
    elif args.figure == "weights":
        out = args.out or args.run_dir / "weights.png"
        path = viz.weights(args.run_dir, out, pattern=args.layers, max_layers=args.max_layers,
                           bins=args.bins, include_init=not args.no_init)
    else:
        out = args.out or Path("augment.png")
        path = viz.augment(args.data or settings.sample_data, out, backbone=args.backbone,
                           input_size=args.input_size, presets=args.preset or ["light", "heavy"],
                           n_images=args.images, n_samples=args.samples, seed=args.seed)
    print(json.dumps({"figure": args.figure, "png": str(path)}))
    return 0


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 published; 3 a precision variant missed a threshold (nothing published)."""
    from export.onnx_export import export_run
    from export.quantize import Int8Options, VariantRejectedError, VariantThresholds

    try:
        published = export_run(
            args.run_dir, repository=args.repository or settings.repository,
            name=args.name or settings.model_name, checkpoint=args.checkpoint,
            parity_data=args.parity_data, parity_limit=args.parity_limit or None,
            precision=args.precision, calibration_data=args.calibration_data,
            calibration_limit=args.calibration_limit or None,
            variant_thresholds=VariantThresholds.from_settings(settings),
            int8_options=Int8Options(calibrate_method=args.calibrate_method,
                                     float_head=not args.int8_quantize_head),
        )
    except VariantRejectedError as exc:
        print(f"cnn-codes export: {exc}", file=sys.stderr)
        print(json.dumps({"published": False, "precision": args.precision,
                          "failures": exc.failures,
                          "variant_check": exc.check.model_dump(exclude={"conversion"})}))
        return 3
    card = published.card
    print(json.dumps({"path": str(published.path), "name": card.name, "version": card.version,
                      "precision": card.precision,
                      "parity": card.parity.model_dump() if card.parity else None,
                      "variant_check": card.variant_check.model_dump(exclude={"conversion"})
                      if card.variant_check else None}))
    return 0


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """``models list|show|verify|promote|remove`` over the model repository.

    Errors (unknown model/version, corrupt files, alias conflicts) exit 1 with a message.
    """
    from models.repository import (ModelIntegrityError, ModelNotFoundError, list_models,
                                   read_aliases, remove_version, resolve, set_alias)

    repository = args.repository or settings.repository
    if args.action == "list":
        for name, versions in list_models(repository).items():
            aliases = ",".join(f"{a}={v}" for a, v in sorted(read_aliases(repository,
                                                                           name).items()))
            print(f"{name}\t{','.join(map(str, versions))}" + (f"\t{aliases}" if aliases else ""))
        return 0
    if not args.name:
        raise SystemExit(f"models {args.action}: a model name is required")
    name, _, version = args.name.partition(":")
    try:
        if args.action == "promote":
            if not version:
                raise SystemExit("models promote: give NAME:VERSION")
            published = set_alias(repository, name, args.alias, int(version))
            print(f"{name}:{args.alias} -> {published.card.version}")
        elif args.action == "remove":
            if not version.isdigit():
                raise SystemExit("models remove: give NAME:VERSION (a number)")
            remove_version(repository, name, int(version), force=args.force)
            print(f"removed {name}:{version}")
        else:
            published = resolve(repository, name, version or "latest")  # verifies sha256
            if args.action == "show":
                print(published.card.model_dump_json(indent=2))
            else:
                print(f"OK {name}:{published.card.version} sha256 {published.card.onnx_sha256}")
    except (ModelNotFoundError, ModelIntegrityError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    """Build the default model when the repository has no version of ``model_name``."""
    from models.repository import list_versions

    if list_versions(settings.repository, settings.model_name) and not args.force:
        logger.info("model %r already in %s; nothing to build", settings.model_name,
                    settings.repository)
        return 0
    from export.onnx_export import export_run
    from training.config import TrainConfig
    from training.trainer import train

    data = settings.sample_data
    if not (data / "train").is_dir():
        raise SystemExit(f"sample data not found at {data.resolve()} "
                         "(set CNN_CODES_SAMPLE_DATA to an ImageFolder with train/ and val/)")
    run_dir = Path("runs") / f"{settings.model_name}-{settings.default_backbone}"
    config = TrainConfig(data=data, backbone=settings.default_backbone,
                         epochs=settings.default_epochs, lr=settings.default_lr)
    logger.info("building the default model: %s, %d epochs on %s (random init: ImageNet "
                "weights cannot be downloaded here) -> %s", config.backbone, config.epochs,
                data, run_dir)
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    train(config, run_dir, resume=resume)
    published = export_run(run_dir, repository=settings.repository, name=settings.model_name)
    logger.info("published %s:%d (val_acc %.3f) at %s", published.card.name,
                published.card.version, published.card.training.get("val_acc") or 0.0,
                published.path)
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the BentoML service (replaces this process with ``bentoml serve``)."""
    env = dict(os.environ)
    env["CNN_CODES_REPOSITORY"] = str((args.repository or settings.repository).resolve())
    env["CNN_CODES_MODEL_NAME"], _, version = (args.model or settings.model_name).partition(":")
    if version:
        env["CNN_CODES_MODEL_VERSION"] = version
    host, port = args.host or settings.host, args.port if args.port is not None else settings.port
    env["CNN_CODES_HOST"] = host  # the gRPC server (service/kserve) binds the same host
    # Each instance gets its own BENTOML_HOME: Prometheus' multiprocess directory lives there.
    env.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="cnn-codes-bentoml-"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    base = f"http://{host}:{port}"
    logger.info(
        "serving %s from %s on %s\n  curl -F images=@ant.jpg -F top_k=2 %s/classify\n"
        "  curl -F images=@ant.jpg -F layer=embedding %s/embed\n  curl %s/metadata",
        env["CNN_CODES_MODEL_NAME"], env["CNN_CODES_REPOSITORY"], base, base, base, base)
    argv = [sys.executable, "-m", "bentoml", "serve", "service.service:CNNCodes",
            "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    """Batch embedding job: images -> Parquet CNN codes, resumable (see :mod:`batch.job`).

    Exit 0 done (failed images are rows with an ``error_code``, not a failed job); 2 bad
    sources, unknown model or an output folder holding another job.
    """
    from batch.job import DecodeLimits, JobMismatchError
    from batch.runner import JobOptions, run_job
    from batch.sources import SourceError
    from models.repository import ModelIntegrityError, ModelNotFoundError, resolve
    from service.runtime import SessionConfig

    name, _, version = (args.model or settings.model_name).partition(":")
    options = JobOptions(
        batch_size=args.batch_size, decode_workers=args.decode_workers or (os.cpu_count() or 1),
        limits=DecodeLimits(max_pixels=settings.max_image_pixels,
                            min_side=settings.min_image_side),
        session_config=SessionConfig.from_settings(settings), engine=args.engine,
        ray_address=args.ray_address, ray_actors=args.ray_actors,
        progress=not args.no_progress)
    try:
        model = resolve(args.repository or settings.repository, name,
                        version or settings.model_version)
        report = run_job(args.sources, args.out, model, layer=args.layer,
                         normalize=not args.no_normalize, dtype=args.dtype,
                         shard_size=args.shard_size,
                         options=options)
    except (SourceError, JobMismatchError, ModelNotFoundError, ModelIntegrityError) as exc:
        print(f"cnn-codes embed: {exc}", file=sys.stderr)
        return 2
    print(report.model_dump_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cnn-codes`` (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(prog="cnn-codes", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list registered backbones with their dims")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser(
        "train", help="fine-tune a backbone on an ImageFolder (train/ + val/)",
        description="Fine-tune a registry backbone. Settings: defaults < --config FILE < flags; "
                    "the resolved config is written to OUT/config.json and OUT/config.yaml. "
                    "Field meanings: training/config.py (TrainConfig).")
    p.add_argument("--config", type=Path, help="YAML/JSON file of TrainConfig fields")
    p.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--backbone", help="registry name (default mobilenet_v3_large)")
    p.add_argument("--weights", help="DEFAULT / IMAGENET1K_V1 (from $TORCH_HOME) / "
                                     "checkpoint path / none")
    p.add_argument("--mode", choices=["finetune", "feature-extract"])
    p.add_argument("--unfreeze-after", type=int, metavar="N",
                   help="feature-extract: unfreeze the backbone after N epochs")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, help="head learning rate")
    p.add_argument("--backbone-lr-mult", type=float, help="backbone lr = lr x this")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="not applied to norms and biases")
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up length (fractions ok)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--class-weights", choices=["none", "balanced"])
    p.add_argument("--grad-clip-norm", type=float, help="clip the global gradient L2 norm")
    p.add_argument("--early-stopping-patience", type=int, metavar="EPOCHS")
    p.add_argument("--early-stopping-metric", choices=["val_loss", "val_acc"])
    p.add_argument("--early-stopping-min-delta", type=float)
    p.add_argument("--augment", choices=["none", "light", "standard", "heavy"])
    p.add_argument("--input-size", type=int, help="input side in pixels (default: weights preset)")
    p.add_argument("--bn-momentum", type=float, help="BatchNorm momentum (default: see docs)")
    p.add_argument("--precise-bn-batches", type=int,
                   help="recompute BatchNorm statistics over N training batches after each "
                        "epoch (0 = off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on; ignored on the CPU)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="cuDNN deterministic kernels on CUDA")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("summary", help="per-layer table: output shapes, parameters, MACs")
    p.add_argument("backbone", help="registry name")
    p.add_argument("--input-size", type=int, help="input side S (default: weights preset)")
    p.add_argument("--num-classes", type=int, default=1000, help="K of the head")
    p.add_argument("--mode", choices=["finetune", "feature-extract"], default="finetune",
                   help="which parameters are trainable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("viz", help="diagnostic PNGs (curves, filters, weights, augment)")
    figures = p.add_subparsers(dest="figure", required=True)
    f = figures.add_parser("curves", help="loss/accuracy/dead units/lr per epoch")
    f.add_argument("run_dirs", type=Path, nargs="+")
    f.add_argument("--labels", help="comma-separated legend labels, one per run")
    f.add_argument("--title")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/curves.png)")
    f = figures.add_parser("filters", help="first convolution's kernels as an image grid")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    f.add_argument("--mode", choices=["rgb", "gray"], default="rgb")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/filters_MODE.png)")
    f = figures.add_parser("weights", help="per-layer weight histograms across epochs")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--layers", help="regular expression over state-dict keys")
    f.add_argument("--max-layers", type=int, default=9)
    f.add_argument("--bins", type=int, default=60)
    f.add_argument("--no-init", action="store_true", help="leave out epoch 0 (initialisation)")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/weights.png)")
    f = figures.add_parser("augment", help="augmented training photos per preset")
    f.add_argument("--data", type=Path, help="ImageFolder root (default: the sample data)")
    f.add_argument("--backbone", default="mobilenet_v3_small")
    f.add_argument("--input-size", type=int)
    f.add_argument("--preset", action="append", choices=["none", "light", "standard", "heavy"],
                   help="repeatable (default: light and heavy)")
    f.add_argument("--images", type=int, default=2)
    f.add_argument("--samples", type=int, default=6)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, help="PNG (default ./augment.png)")
    p.set_defaults(func=_cmd_viz)

    p = sub.add_parser("export", help="export a run to ONNX, check it, publish it")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--repository", type=Path)
    p.add_argument("--name")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    p.add_argument("--parity-data", type=Path, help="images for the parity check (default <data>/val)")
    p.add_argument("--parity-limit", type=int, default=64, help="0 = all images")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="int8: static quantisation for the CPU; fp16: for CUDA/TensorRT. The "
                        "variant is checked against fp32 on the parity images and published "
                        "only if it meets the CNN_CODES_VARIANT_* thresholds (else exit 3)")
    p.add_argument("--calibration-data", type=Path,
                   help="int8 calibration images (default <data>/train)")
    p.add_argument("--calibration-limit", type=int, default=64,
                   help="int8: at most this many calibration images, 0 = all")
    p.add_argument("--calibrate-method", choices=["MinMax", "Percentile", "Entropy"],
                   default="MinMax", help="int8 activation range calibration")
    p.add_argument("--int8-quantize-head", action="store_true",
                   help="int8: quantise the dense head too (smaller file, e.g. VGG16 fc6/fc7; "
                        "default: float after the last conv)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("models", help="inspect and manage the model repository")
    p.add_argument("action", choices=["list", "show", "verify", "promote", "remove"])
    p.add_argument("name", nargs="?", help="NAME[:VERSION|ALIAS]")
    p.add_argument("--repository", type=Path)
    p.add_argument("--alias", default="production", help="alias that promote moves")
    p.add_argument("--force", action="store_true", help="remove even if an alias points at it")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("bootstrap", help="build the default model if the repository lacks it")
    p.add_argument("--force", action="store_true", help="build a new version even if one exists")
    p.set_defaults(func=_cmd_bootstrap)

    p = sub.add_parser("embed", help="batch job: CNN codes of many images -> Parquet, resumable")
    p.add_argument("sources", nargs="+",
                   help="directories, glob patterns, or manifests (.txt a path per line; "
                        ".csv/.parquet with a 'path' column)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (part-NNNNN.parquet); run again to resume")
    p.add_argument("--model", help="NAME[:VERSION|ALIAS] (default: the served model setting)")
    p.add_argument("--repository", type=Path)
    p.add_argument("--layer", choices=["embedding", "features"], default="embedding",
                   help="penultimate layer (embedding) or pooled conv output (features)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not L2) vectors")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored value type (float16 halves the files)")
    p.add_argument("--shard-size", type=_positive_int, default=1024,
                   help="images per part file")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="images per onnxruntime run")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="decoding threads per process, 0 = one per core")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: Ray Data map_batches over parts, one model per actor")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--ray-actors", type=_positive_int, default=1,
                   help="Ray actors (model replicas)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("serve", help="serve HTTP with BentoML")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--repository", type=Path)
    p.add_argument("--model", help="NAME[:VERSION]")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cnn-codes``; returns the exit status."""
    apply_offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args, Settings()) or 0)


if __name__ == "__main__":
    sys.exit(main())
