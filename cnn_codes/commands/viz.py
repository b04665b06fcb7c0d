"""``cnn-codes viz``: diagnostic PNGs (learning curves, filters, weight histograms, augment),
maps and grids of CNN codes (codes, neighbours) and what the convnet learned (activations,
gradcam).

Exit statuses of ``codes``, ``neighbours``, ``activations``, ``gradcam``: see
:data:`EXIT_STATUSES`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnn_codes.commands._common import positive_int, report_error
from cnn_codes.settings import Settings

EXIT_OK = 0
EXIT_BAD_INPUT = 2

EXIT_STATUSES = f"""\
exit status:
  {EXIT_OK}  the PNG was written; a JSON line gives its path, pixel size, panels and what was read
  1  unexpected error (a traceback)
  {EXIT_BAD_INPUT}  bad input, one line on stderr: not an embed output / index folder, an image that
     cannot be used, an unknown layer or class, a run folder without the checkpoint, a published
     model version without a torch checkpoint beside its ONNX file (pass its training run
     folder), an unknown or damaged model version
"""

# The figures that answer bad input with one line and EXIT_BAD_INPUT.
_CHECKED = ("codes", "neighbours", "activations", "gradcam")

PRESETS = ["none", "light", "standard", "heavy"]


def _add_curves(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("curves", help="loss/accuracy/dead units/lr per epoch")
    f.add_argument("run_dirs", type=Path, nargs="+")
    f.add_argument("--labels", help="comma-separated legend labels, one per run")
    f.add_argument("--title")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/curves.png)")


def _add_filters(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("filters", help="first convolution's kernels as an image grid")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    f.add_argument("--mode", choices=["rgb", "gray"], default="rgb")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/filters_MODE.png)")


def _add_weights(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("weights", help="per-layer weight histograms across epochs")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--layers", help="regular expression over state-dict keys")
    f.add_argument("--max-layers", type=int, default=9)
    f.add_argument("--bins", type=int, default=60)
    f.add_argument("--no-init", action="store_true", help="leave out epoch 0 (initialisation)")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/weights.png)")


def _add_augment(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("augment", help="augmented training photos per preset")
    f.add_argument("--data", type=Path, help="ImageFolder root (default: the sample data)")
    f.add_argument("--backbone", default="mobilenet_v3_small")
    f.add_argument("--input-size", type=int)
    f.add_argument("--preset", action="append", choices=PRESETS,
                   help="repeatable (default: light and heavy)")
    f.add_argument("--images", type=int, default=2)
    f.add_argument("--samples", type=int, default=6)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, help="PNG (default ./augment.png)")


def _checked_parser(figures: argparse._SubParsersAction, name: str, help: str,
                    description: str) -> argparse.ArgumentParser:
    return figures.add_parser(name, help=help, description=description, epilog=EXIT_STATUSES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_codes(figures: argparse._SubParsersAction) -> None:
    f = _checked_parser(figures, "codes", "2-D t-SNE map of the codes of embed output",
                        "A 2-D t-SNE (scikit-learn) of the CNN codes in cnn-codes embed output "
                        "folders, points coloured by label (the parent folder of each image), "
                        "optionally with the images as thumbnails at their points.")
    f.add_argument("emb_dirs", type=Path, nargs="+", metavar="EMB_DIR",
                   help="cnn-codes embed output folders (one model version and layer)")
    f.add_argument("--thumbnails", action="store_true", help="draw the images at their points")
    f.add_argument("--thumbnail-px", type=positive_int, default=40, help="thumbnail side")
    f.add_argument("--max-points", type=positive_int, default=2000,
                   help="map a seeded random sample of at most this many codes")
    f.add_argument("--perplexity", type=float,
                   help="t-SNE perplexity (default min(30, (N - 1) / 3))")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--repository", type=Path,
                   help="model repository (thumbnails use the model card's crop; default: "
                        "the setting)")
    f.add_argument("--out", type=Path, help="PNG (default ./codes.png)")


def _add_neighbours(figures: argparse._SubParsersAction) -> None:
    f = _checked_parser(figures, "neighbours", "query images with their k nearest neighbours",
                        "Each IMAGE with its k nearest images in a cnn-codes index build "
                        "folder and their cosine scores, one row per query (the query path "
                        "of cnn-codes index query).")
    f.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    f.add_argument("images", nargs="+", metavar="IMAGE")
    f.add_argument("-k", type=positive_int, default=5, help="neighbours per image")
    f.add_argument("--repository", type=Path, help="model repository (default: the setting)")
    f.add_argument("--out", type=Path, help="PNG (default ./neighbours.png)")


_SOURCE_HELP = ("a training run folder, a checkpoint file, or a published model "
                "NAME[:VERSION|ALIAS] with a torch checkpoint beside its ONNX file")


def _add_activations(figures: argparse._SubParsersAction) -> None:
    f = _checked_parser(figures, "activations", "feature maps of chosen layers for one image",
                        "The feature maps of chosen layers of the torch model for one image "
                        "(forward hooks); default: the first conv, a middle block and the last "
                        "conv block of the feature extractor.")
    f.add_argument("source", metavar="RUN_DIR|MODEL", help=_SOURCE_HELP)
    f.add_argument("image", metavar="IMAGE")
    f.add_argument("--layers", nargs="+", metavar="LAYER",
                   help="module names, e.g. net.features.0.0 net.features.6 (default: first "
                        "conv, middle block, last block)")
    f.add_argument("--max-channels", type=positive_int, default=16,
                   help="most active channels shown per layer")
    f.add_argument("--checkpoint", default="best", help="of a run: best, last, or a file")
    f.add_argument("--repository", type=Path, help="model repository (default: the setting)")
    f.add_argument("--out", type=Path, help="PNG (default ./activations.png)")


def _add_gradcam(figures: argparse._SubParsersAction) -> None:
    f = _checked_parser(figures, "gradcam", "Grad-CAM of the predicted class over one image",
                        "Grad-CAM (Selvaraju et al., 2017) of the predicted class (or --class) "
                        "on the last conv block of the feature extractor, over the image.")
    f.add_argument("source", metavar="RUN_DIR|MODEL", help=_SOURCE_HELP)
    f.add_argument("image", metavar="IMAGE")
    f.add_argument("--class", dest="target", metavar="CLASS",
                   help="class name or index to explain (default: the predicted class)")
    f.add_argument("--checkpoint", default="best", help="of a run: best, last, or a file")
    f.add_argument("--repository", type=Path, help="model repository (default: the setting)")
    f.add_argument("--out", type=Path, help="PNG (default ./gradcam.png)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``viz curves|filters|weights|augment|codes|neighbours|activations|gradcam``
    on ``subparsers``."""
    parser = subparsers.add_parser(
        "viz", help="PNGs: curves, filters, weights, augment, codes, neighbours, activations, "
                    "gradcam")
    figures = parser.add_subparsers(dest="figure", required=True)
    for add in (_add_curves, _add_filters, _add_weights, _add_augment, _add_codes,
                _add_neighbours, _add_activations, _add_gradcam):
        add(figures)
    parser.set_defaults(func=run)
    return parser


def _draw(args: argparse.Namespace, settings: Settings) -> Path:
    """Draw the figure ``args.figure`` and return the PNG's path."""
    from diagnostics import viz

    if args.figure == "curves":
        labels = args.labels.split(",") if args.labels else None
        return viz.curves(args.run_dirs, args.out or args.run_dirs[0] / "curves.png", labels,
                          title=args.title)
    if args.figure == "filters":
        out = args.out or args.run_dir / f"filters_{args.mode}.png"
        return viz.filters(args.run_dir, out, checkpoint=args.checkpoint, mode=args.mode)
    if args.figure == "weights":
        return viz.weights(args.run_dir, args.out or args.run_dir / "weights.png",
                           pattern=args.layers, max_layers=args.max_layers, bins=args.bins,
                           include_init=not args.no_init)
    return viz.augment(args.data or settings.sample_data, args.out or Path("augment.png"),
                       backbone=args.backbone, input_size=args.input_size,
                       presets=args.preset or ["light", "heavy"], n_images=args.images,
                       n_samples=args.samples, seed=args.seed)


def _draw_checked(args: argparse.Namespace, settings: Settings) -> dict:
    """Draw ``codes``/``neighbours``/``activations``/``gradcam``; the PNG's layout and facts."""
    from models.decode import DecodeLimits

    repository = args.repository or settings.repository
    limits = DecodeLimits.from_settings(settings)
    out = args.out or Path(f"{args.figure}.png")
    if args.figure == "codes":
        from diagnostics.codes import code_map

        drawn = code_map(args.emb_dirs, out, repository=repository, thumbnails=args.thumbnails,
                         thumbnail_px=args.thumbnail_px, max_points=args.max_points,
                         perplexity=args.perplexity, seed=args.seed, limits=limits)
    elif args.figure == "neighbours":
        from diagnostics.codes import neighbour_grid
        from models.runtime import SessionConfig

        drawn = neighbour_grid(args.index_dir, args.images, out, repository=repository,
                               k=args.k, limits=limits,
                               session_config=SessionConfig.from_settings(settings))
    else:
        from diagnostics import convnet

        source = convnet.open_torch_model(args.source, repository=repository,
                                          checkpoint=args.checkpoint)
        if args.figure == "activations":
            drawn = convnet.activations_figure(source, args.image, out, layers=args.layers,
                                               max_channels=args.max_channels, limits=limits)
        else:
            drawn = convnet.gradcam_figure(source, args.image, out, target=args.target,
                                           limits=limits)
    return drawn.as_dict()


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Draw one figure and print ``{"figure": ..., "png": ...}`` (for codes, neighbours,
    activations and gradcam also the layout and what was read); bad input to those is one
    line on stderr and exit status 2 (:data:`EXIT_STATUSES`)."""
    if args.figure not in _CHECKED:
        path = _draw(args, settings)
        print(json.dumps({"figure": args.figure, "png": str(path)}))
        return EXIT_OK
    from models.errors import CNNCodesError, ImageError

    try:
        result = _draw_checked(args, settings)
    except ImageError as exc:  # the one image of activations / gradcam
        report_error(f"cnn-codes viz {args.figure}: cannot use "
                     f"{getattr(args, 'image', 'the image')}: {exc}")
        return EXIT_BAD_INPUT
    except ImportError as exc:
        report_error(f"cnn-codes viz {args.figure}: {exc} (install the viz extra: "
                     "pip install -e '.[viz]')")
        return EXIT_BAD_INPUT
    except (FileNotFoundError, LookupError, ValueError, CNNCodesError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        report_error(f"cnn-codes viz {args.figure}: {message}")
        return EXIT_BAD_INPUT
    print(json.dumps({"figure": args.figure, **result}))
    return EXIT_OK
