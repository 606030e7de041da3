"""Deploy-time steps of `prefect.yaml`.

A deployment's runs execute in the checkout it was deployed from: `prefect deploy` records that
folder (the `project_root` build step below) and the worker's pull step moves there. A folder
that is not a RecForge checkout is refused at deploy time with a message, instead of runs
that crash later on a missing `flows/training.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

REQUIRED = ("flows/training.py", "params.yaml", "prefect.yaml")


class NotACheckout(ValueError):
    pass


def project_root(directory: str | None = None) -> dict[str, str]:
    """The checkout runs will execute in: `directory`, else $RECFORGE_HOME, else the folder
    `prefect deploy` runs in. Returns `{"directory": ...}` for the pull step."""
    given = directory or os.environ.get("RECFORGE_HOME")
    root = Path(given or Path.cwd()).expanduser().resolve()
    missing = [f for f in REQUIRED if not (root / f).is_file()]
    if missing:
        where = f"RECFORGE_HOME={given}" if given else f"the current folder {root}"
        raise NotACheckout(
            f"{where} is not a RecForge checkout (no {', '.join(missing)}): run `prefect deploy` from the "
            f"checkout the worker should run, or set RECFORGE_HOME to it")
    return {"directory": str(root)}
