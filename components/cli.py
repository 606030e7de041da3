"""Shared command-line plumbing: every entry point takes `--params FILE` and repeated `--set`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from components.config import DEFAULT_PARAMS, Params, ParamsError, load_params

ARTIFACTS = Path("artifacts")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_params_arguments(parser)
    return parser


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help="settings file (default: params.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set mf.factors=128 (value parsed as YAML; repeatable)",
    )
    parser.add_argument(
        "--artifacts", type=Path, default=ARTIFACTS, help="root folder of outputs (default: artifacts)"
    )


def setup_logging() -> None:
    # INFO for our own code; libraries (onnxruntime's quantizer logs every tensor on the root
    # logger, the ONNX exporter every folded constant) only from WARNING up.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for name in ("components", "benchmarks", "flows", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)


def params_from_args(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a CLI main: settings errors become a one-line message and exit code 2."""
    setup_logging()
    try:
        code = main()
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
