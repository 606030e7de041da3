"""Helpers shared by the benchmarks: JSON output and peak memory."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any, Callable


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux's `ru_maxrss` survives fork + exec, so a child started by a big parent would report
    the parent's peak; `VmHWM` belongs to the process's own address space.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def children_peak_rss_mb() -> float:
    """Peak RSS of the processes this one started that are still running, added up (a Spark
    session's JVM): an upper bound of their memory at any one time, in MB."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:  # ended meanwhile, or not Linux
            continue
    return total


def machine() -> dict[str, Any]:
    import os

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def save(out: dict[str, Any], path: Path, plot: Callable[[dict[str, Any], Path], None]) -> None:
    """The results with the machine they came from, and their plot beside them (`X.png`)."""
    out["machine"] = machine()
    write_json(path, out)
    plot(out, path.with_suffix(".png"))


PRESETS = Path(__file__).resolve().parents[1] / "presets"


def datasets() -> list[str]:
    """`synthetic` (params.yaml as it is) and one per preset file in presets/."""
    return ["synthetic", *sorted(p.stem for p in PRESETS.glob("*.yaml"))]


def dataset_params(params_path: Path, dataset: str, data_dir: Path | None = None, overrides: list[str] = (),
                   override_files: list[Path] = ()):
    """The settings of a benchmark on `dataset`: params.yaml, the dataset's preset, further
    preset files, `data.path` when a folder is given, then the `--set` overrides."""
    from components.config import load_params

    if dataset not in datasets():
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(datasets())}")
    preset = [PRESETS / f"{dataset}.yaml"] if dataset != "synthetic" else []
    where = [f"data.path={data_dir}"] if data_dir else []
    return load_params(params_path, [*where, *overrides], [*preset, *override_files])


def settings_by_dataset(parser: Any, args: Any) -> dict[str, Any]:
    """Each dataset a comma-separated `--dataset` names, with its settings (`--data-dir`, where
    the command has it, for one dataset only): all checked before the first runs, so a bad name
    or setting never costs the results of the datasets before it."""
    names = names_of(parser, "--dataset", args.dataset, datasets())
    data_dir = getattr(args, "data_dir", None)
    if data_dir and len(names) > 1:
        parser.error("--data-dir needs a single --dataset")
    return {d: dataset_params(args.params, d, data_dir, args.overrides, args.override_files) for d in names}


def names_of(parser: Any, option: str, value: str, known: Any) -> list[str]:
    """The names a comma-separated option lists, each one of `known`; otherwise a usage error
    (exit 2) naming the unknown ones and the choices."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{option}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names
