"""The single-process alternative to a work pool: serve the training flow on a cron schedule.

    python -m flows.serve --cron "0 2 * * *" --set bert.finetune.max_epochs=30
"""

from __future__ import annotations

import argparse

from flows.training import training


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cron", default="0 2 * * *", help="schedule (UTC), default nightly at 02:00")
    parser.add_argument("--name", default="nightly-retrain-serve")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", default="artifacts")
    args = parser.parse_args()
    training.serve(name=args.name, cron=args.cron,
                   parameters={"overrides": args.overrides, "params_file": args.params, "artifacts": args.artifacts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
