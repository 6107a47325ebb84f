"""Progress of one long transfer: a compiled root's download (s3://) or upload (compile.py --upload), and
deploy's upload of model.tar.gz. Bytes, rate and time left, shown two ways:

- on a terminal, as a tqdm bar on stderr (tqdm redraws one line);
- anywhere else (the app's log, the endpoint's CloudWatch log, CI), as a line every EVERY_S seconds or each
  EVERY_FRACTION of the bytes, whichever comes first: a bar's carriage returns would make one endless line
  of such a log.

Either way the end gets one line: the bytes moved, how long it took and the rate.

TransferProgress is called with the bytes moved since the last call, which is what boto3's transfer methods
pass to their `Callback` (boto3/s3/inject.py, upload_file: "A method which takes a number of bytes transferred
to be periodically called during the upload"). s3transfer calls it from its worker threads, and with a negative
amount when a part is retried ("progress was rewound", s3transfer/subscribers.py, on_progress), so the count is
kept under a lock and may go down.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_S = 30.0  # a log line at least this often while bytes move
EVERY_FRACTION = 0.1  # and at each 10% of the bytes


def size_text(count: float) -> str:
    """Bytes as people read them in a log: 512 bytes, 12.3 kB, 45.6 MB, 7.89 GB (powers of 1000, as S3 bills)."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if abs(count) >= scale:
            return f"{count / scale:.{digits}f} {unit}"
    return f"{int(count)} bytes"


def duration_text(seconds: float) -> str:
    """A duration as people read it: 42 s, 3 min 5 s, 1 h 12 min."""
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class TransferProgress:
    """Counts the bytes of one transfer (`what` names it in every line), of `total` bytes in all.

    `echo` takes each line (default: this module's logger at INFO); `bar` chooses the tqdm bar (default: when
    `stream`, stderr by default, is a terminal). Use it as a context manager, or call close() at the end.
    """

    def __init__(self, what: str, total: int, echo: Callable[[str], None] | None = None, *, bar: bool | None = None,
                 stream: TextIO | None = None, every_s: float = EVERY_S, every_fraction: float = EVERY_FRACTION,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.total = int(total)  # bytes this transfer moves (skip() takes out what was already in place)
        self.done = 0  # bytes moved so far
        self.skipped = 0  # bytes found already in place
        self._echo = echo or log.info
        self._clock = clock
        self._every_s = every_s
        self._every_fraction = every_fraction
        self._lock = threading.Lock()
        self._started = self._last_line = clock()
        self._step = 0  # the last EVERY_FRACTION step a line was written at
        self._closed = False
        stream = stream or sys.stderr
        use_bar = _is_terminal(stream) if bar is None else bar
        self._bar = tqdm(total=self.total, desc=what, unit="B", unit_scale=True, file=stream, leave=True,
                         dynamic_ncols=True) if use_bar else None

    def __call__(self, bytes_transferred: int) -> None:
        """Count bytes moved (boto3 passes them by this keyword; negative when a retried part is rewound)."""
        with self._lock:
            self.done += bytes_transferred
            if self._bar is not None:
                self._bar.update(bytes_transferred)
                return
            now = self._clock()
            fraction = self.done / self.total if self.total > 0 else 1.0
            if self.done >= self.total:
                return  # close() says how it ended
            step = int(fraction / self._every_fraction + 1e-9)  # whole steps, so 0.1 + 0.2 is at step 3
            if now - self._last_line >= self._every_s or step > self._step:
                self._last_line, self._step = now, max(step, self._step)
                self._echo(self._line(now, fraction))

    def skip(self, count: int) -> None:
        """Take `count` bytes that were already in place (a verified file, a resumed part) out of what is left."""
        with self._lock:
            self.skipped += count
            self.total -= count
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def rate(self, now: float | None = None) -> float:
        """Bytes per second since the start."""
        elapsed = (self._clock() if now is None else now) - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._started

    def _line(self, now: float, fraction: float) -> str:
        rate = self.rate(now)
        left = f", about {duration_text((self.total - self.done) / rate)} left" if rate > 0 else ""
        return (f"{self.what}: {size_text(self.done)} of {size_text(self.total)} ({fraction:.0%}), "
                f"{size_text(rate)}/s{left}")

    def close(self, failed: bool = False) -> str:
        """Close the bar and echo (and return) the closing line: the bytes moved, the time and the rate."""
        with self._lock:
            if self._closed:
                return ""
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            now = self._clock()
            seconds = now - self._started
            took = f"in {seconds:.1f} s" if seconds < 90 else f"in {duration_text(seconds)}"
            took += f", {size_text(self.rate(now))}/s"
            before = f"; {size_text(self.skipped)} were already in place" if self.skipped else ""
            if failed:
                line = (f"{self.what}: stopped after {self.done:,} of {self.total:,} bytes "
                        f"({size_text(self.done)} of {size_text(self.total)}) {took}{before}")
            else:
                line = f"{self.what}: {self.done:,} bytes ({size_text(self.done)}) {took}{before}"
            self._echo(line)
            return line

    def __enter__(self) -> "TransferProgress":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)
