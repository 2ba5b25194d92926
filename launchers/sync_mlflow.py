"""``python launchers/sync_mlflow.py RUN_DIR``: deliver to MLflow what a run logged while MLflow was away.

``RUN_DIR/metrics.jsonl`` is the run's record; everything MLflow has not taken yet (an outage, a ``finish`` that
timed out) is sent, once, to the run it belongs to, ending with the run's final status. Safe to run at any time,
also next to a live run, and again: nothing is sent twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_loaders.errors import SovitError
from launchers import parser
from pipeline import tracking


def main(argv: list[str] | None = None) -> None:
    p = parser("launchers/sync_mlflow.py", __doc__)
    p.add_argument("run_dir", type=Path, help="run directory (or its metrics.jsonl)")
    p.add_argument("--uri", help="tracking URI (default: the one the run logged to)")
    a = p.parse_args(argv)
    record = a.run_dir / "metrics.jsonl" if a.run_dir.is_dir() else a.run_dir
    try:
        done = tracking.sync(record, a.uri)
    except (SovitError, OSError, ValueError) as e:  # no record of a tracked run, or one this cannot read
        print(f"error: {tracking.redact(str(e))}", file=sys.stderr)
        raise SystemExit(e.exit_code if isinstance(e, SovitError) else 2) from None
    except Exception as e:  # MLflow unreachable: nothing was lost, try again later
        print(f"error: MLflow did not take the record ({tracking.redact(str(e).splitlines()[0])}); nothing is "
              "lost, run this again later", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"delivered {done.records} record(s) to run {done.run_id}, status {done.status}")
    if done.link:
        print(f"view: {done.link}")


if __name__ == "__main__":
    main()
