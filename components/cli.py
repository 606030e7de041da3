"""Shared command-line plumbing: every entry point takes `--params FILE`, `--params-overrides
FILE` (a preset laid over it) and repeated `--set key=value`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from components.config import DEFAULT_PARAMS, Params, load_params

ARTIFACTS = Path("artifacts")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_params_arguments(parser)
    return parser


def add_params_arguments(parser: argparse.ArgumentParser, artifacts: bool = True) -> None:
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help="settings file (default: params.yaml)"
    )
    parser.add_argument(
        "--params-overrides",
        dest="override_files",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a partial settings file laid over --params, e.g. presets/movielens-100k.yaml (repeatable)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set mf.factors=128 (value parsed as YAML; repeatable; applied last)",
    )
    if artifacts:
        parser.add_argument(
            "--artifacts", type=folder_arg, default=ARTIFACTS, help="root folder of outputs (default: artifacts)"
        )


def folder_arg(text: str) -> Path:
    """A folder argument: a path that does not exist yet, or a folder (never a file)."""
    path = Path(text)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a folder" + (" (a file)" if path.is_file() else ""))
    return path


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    """Library chatter users cannot act on, filtered from the project's output: Lightning's
    tips and device banners, the ONNX exporter's notes on optional packages the project does not
    use (torchvision), onnxruntime's quantizer advice, transformers' weight-loading reports and
    progress bars, and deprecations inside the libraries themselves."""
    for name in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch configures its own loggers' levels when imported: a filter on the logger stays.
    torchvision = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not torchvision.filters:
        torchvision.addFilter(_DropMessages("torchvision is not installed"))
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    drop = _DropMessages("Please consider to run pre-processing before quantization")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropMessages) for f in handler.filters):
            handler.addFilter(drop)
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # Validation metrics are summed over ranks by the module itself before they are logged.
    warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('val_.*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
    # The BERT stages keep their resume marker in their checkpoint folder.
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    # Read by transformers and huggingface_hub when they are imported (not imported here: most
    # stages never need them).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Set by the pipeline for a stage's own process, whose lines land in a log that stamps them.
PLAIN_LOGS = "RECFORGE_PLAIN_LOGS"


def setup_logging() -> None:
    # INFO for our own code; libraries (onnxruntime's quantizer logs every tensor on the root
    # logger, the ONNX exporter every folded constant) only from WARNING up.
    fmt = "%(name)s: %(message)s" if os.environ.get(PLAIN_LOGS) else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    for name in ("components", "benchmarks", "flows", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_libraries()


def params_from_args(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides, args.override_files)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a CLI main. Errors that carry an `exit_code` (bad settings, an unreadable source, a
    failed validation) are a message and that exit code, not a traceback."""
    setup_logging()
    try:
        code = main()
    except Exception as exc:
        exit_code = getattr(exc, "exit_code", None)
        if exit_code is None:
            raise
        print(f"error: {exc}" if exit_code == 2 else str(exc), file=sys.stderr)
        sys.exit(exit_code)
    sys.exit(code or 0)
