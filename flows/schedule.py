"""The single-process alternative to a work pool: this process serves the training flow on a
cron schedule (Prefect's `flow.serve`), for a machine without a worker.

    python -m flows.schedule --cron "0 2 * * *" --set bert.finetune.max_epochs=30
"""

from __future__ import annotations

import argparse

from flows.training import training


def main() -> int:
    from prefect.client.schemas.schedules import CronSchedule

    from components.cli import add_params_arguments, params_from_args, run_main

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cron", default="0 2 * * *", help="schedule (UTC), default nightly at 02:00")
    parser.add_argument("--name", default="nightly-retrain-serve")
    add_params_arguments(parser)

    def serve() -> int:
        args = parser.parse_args()
        try:  # Prefect's own rule, checked before anything starts
            CronSchedule(cron=args.cron)
        except ValueError:
            parser.error(f"--cron {args.cron!r}: not a cron schedule (minute hour day month weekday, e.g. '0 2 * * *')")
        # Bad settings fail now, not at the first scheduled run hours later.
        params_from_args(args)
        training.serve(name=args.name, cron=args.cron,
                       parameters={"overrides": args.overrides, "params_file": str(args.params),
                                   "artifacts": str(args.artifacts),
                                   "params_overrides": [str(f) for f in args.override_files]})
        return 0

    run_main(serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
