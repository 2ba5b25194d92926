"""How a run stops early. SIGUSR1 (SLURM's time-limit warning, or a preemption notice), SIGTERM (``scancel``,
preemption without a warning) and Ctrl-C set a flag. Ranks agree on it every ``train.stop_check_every_steps``
optimizer steps (one small all-reduce; checking every step would force a host sync per step), save the same step and
return:

    FINISHED   the schedule (or train.max_steps) is done
    STOPPED    SIGUSR1: saved; the caller requeues the job, which resumes from ``latest`` into the same MLflow run
    KILLED     SIGTERM or Ctrl-C: saved when SLURM's grace time allows, not requeued by us
    FAILED     the loss became NaN/inf; the checkpoints saved since the last finite loss are set aside, and the
               message names the last good one

The MLflow run always ends with one of FINISHED, KILLED (for STOPPED too: the requeued job sets it RUNNING again)
or FAILED.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, ClassVar

from . import distributed
from .result import Status

# SLURM sends SIGKILL this long after SIGTERM (its KillWait default): a save must fit in it to be worth starting
TERM_GRACE_S = 30.0


class StopSignals:
    """Turns SIGUSR1/SIGTERM/SIGINT into a flag for the duration of a run; the previous handlers come back after.

    A second Ctrl-C (a second later or more) quits at once, for a user who does not want to wait for the save."""

    CODES: ClassVar[dict[int, int]] = {signal.SIGUSR1: 1, signal.SIGTERM: 2, signal.SIGINT: 2}  # highest wins
    STATUS: ClassVar[dict[int, Status]] = {1: Status.STOPPED, 2: Status.KILLED}

    def __init__(self) -> None:
        self.code, self.since, self.name = 0, 0.0, None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in self.CODES:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.code and time.monotonic() - self.since > 1.0:
            raise KeyboardInterrupt  # a person pressing again, not a launcher echoing the first Ctrl-C to its ranks
        if signum == signal.SIGINT:
            print("\ninterrupted: saving at the next step check (Ctrl-C again to quit without saving)",
                  file=sys.stderr, flush=True)
        self.code, self.since = max(self.code, self.CODES[signum]), self.since or time.monotonic()
        self.name = signal.Signals(signum).name

    def save_fits(self, last_save_seconds: float) -> tuple[bool, float]:
        """Collective: whether to save at the stop, and the seconds of grace left. On SIGUSR1 always (SLURM warned
        ahead); on SIGTERM only when the last save's time fits in what is left of the grace period, since a save
        cut short by SIGKILL is wasted I/O."""
        left = TERM_GRACE_S - (time.monotonic() - self.since) if self.since else TERM_GRACE_S
        return distributed.all_agree(self.code != 2 or last_save_seconds < left), left

    def agreed(self) -> Status | None:
        """Collective: how the run stops, by the highest stop signal any rank got; None: it goes on."""
        return self.STATUS.get(int(distributed.all_reduce([self.code], "max").item()))
