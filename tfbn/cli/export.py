"""`tfbn export`: `tfbn.workflow.model_files.export_keras_file` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import (
    add_data_arguments,
    add_export_dir,
    add_jit_compile,
    add_keras_model,
    add_switch,
    check_data_arguments,
    keywords,
)

HELP = "export a trained .keras model as an inference-only SavedModel"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn export` arguments."""
    add_keras_model(parser)
    add_export_dir(parser, "saved_models")
    parser.add_argument("--name", default="lenet", help="model name folder")
    parser.add_argument(
        "--version", type=int, default=None, help="version number (default: the next free one)"
    )
    add_switch(parser, "--fold", True, "fold batch normalization into the layer before it")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the version folder if it exists"
    )
    add_jit_compile(parser, False, "compile the serving functions with XLA")
    parser.add_argument(
        "--class-names",
        default=None,
        help="class names in output order, comma-separated, or 'fashion-mnist' for its ten "
        "(default: none; the outputs name classes by their ids)",
    )
    parser.add_argument(
        "--pixel-range",
        nargs=2,
        type=float,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="the values the model takes for pixels 0 and 255 (e.g. 0 255 for a model that "
        "rescales its input itself)",
    )
    parser.add_argument(
        "--check-data",
        metavar="FILE",
        action="append",
        default=None,
        help="images to check the export on (repeatable): an IDX image file (e.g. Fashion-MNIST's "
        "t10k-images-idx3-ubyte.gz) or a PNG/JPEG file, of the model's image size (default: "
        "--data, else a fixed synthetic sample)",
    )
    add_data_arguments(
        parser,
        required=False,
        help="inputs to check the export on instead of --check-data, as the model takes them "
        "after --rescale; a small sample, the model runs on all of them (default: none, the "
        "fixed synthetic sample)",
    )


def check(args: argparse.Namespace) -> None:
    """The input model and the export folder, checked before TensorFlow's import."""
    from tfbn.utils.files import check_writable_dir
    from tfbn.utils.saving import check_keras_file

    check_keras_file(args.model)
    check_writable_dir(args.export_dir)
    check_data_arguments(args)
    if args.check_data and args.data is not None:
        raise ValueError("Arguments --check-data and --data name the same thing: give one of them.")


def run(args: argparse.Namespace) -> int:
    """Runs `export_keras_file` with the parsed arguments."""
    from tfbn.workflow.config import CLASS_NAMES
    from tfbn.workflow.model_files import export_keras_file

    names = args.class_names
    if names is not None:
        names = CLASS_NAMES if names == "fashion-mnist" else tuple(names.split(","))
    target = export_keras_file(
        args.model,
        args.export_dir,
        **keywords(args, "name", "version", "fold", "overwrite", "jit_compile"),
        check_files=args.check_data,
        **keywords(args, "data", "rescale", "tfds_dir"),
        class_names=names,
        pixel_range=tuple(args.pixel_range),
        verbose=int(args.verbose > 0),
    )
    print(f"Exported {'folded' if args.fold else 'unfolded'} SavedModel to {target}")
    return 0
