"""What rank 0 shows while it trains: tqdm's bar on a terminal; in a file (a SLURM log, CI) the plain lines of
``LineProgress`` instead of a bar that rewrites one endless line with ``\\r`` and cursor escape codes; and lines of
its own (``write``) that break neither.
"""

from __future__ import annotations

import sys
import time


def bar(total: int, initial: int, enabled: bool, **kw):
    """tqdm's bar on a terminal, ``LineProgress`` elsewhere; ``kw`` are tqdm's (a label, a unit)."""
    if not sys.stderr.isatty():
        return LineProgress(total, initial, enabled)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, mininterval=2.0,
                **{"unit": "step", **kw})


class TrainProgress:
    """The training loop's bar: made with the trainer, shown for the ``with`` block that trains."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.initial, self.enabled = total, initial, enabled
        self._bar = None

    def __enter__(self) -> TrainProgress:
        self._bar = bar(self.total, self.initial, self.enabled)
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def step(self) -> None:
        self._bar.update(1)

    def report(self, **values: str) -> None:
        """One log interval's values: the bar's postfix on a terminal, a line in a log file."""
        self._bar.set_postfix(**values)


class LineProgress:
    """The progress bar's interface for a log file: counting is silent, and each ``set_postfix`` (the trainer calls
    it once per log interval) writes one plain line: ``step 120/1000 (12%) loss 3.210 lr 1.00e-03 img_s 512
    [01:02<07:40]``. An eval, which sets no postfix, writes nothing; its result line is the trainer's own."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.n, self.total, self.enabled = initial, total, enabled
        self._start, self._start_n = time.monotonic(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        fields = " ".join(f"{k} {v}" for k, v in values.items())
        print(f"step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) {fields} "
              f"[{tqdm.format_interval(elapsed)}<{left}]", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def write(line: str) -> None:
    """A line on stdout that does not break the progress bar (which lives on stderr)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
