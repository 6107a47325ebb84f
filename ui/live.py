"""Live mode (text to image): an image on every pause in typing, offered only when a generation is fast.

How a "pause" is defined: `PAUSE_S` (0.4 s) with no keystroke in the prompt, measured on the server.
Every keystroke reaches the server twice: a small unqueued event (`Handlers.live_typing`) that notes the
time and text and stops this session's running live generation (its CancelRegistry event: the backend stops
after its current step, as with Stop), and the queued live event, whose `trigger_mode="always_last"` keeps at
most one of it per browser in flight, plus one deferred that the browser sends, with the prompt's value at
that moment, once the running one is done (gradio's frontend, Blocks-*.js: a trigger while a submission is
in flight becomes `defer`; when it sends the deferred run it dispatches the whole input event again, so
`live_typing` gets the same text a second time: that is no keystroke, and `LiveTyping.typed` does not count it;
counting it restarted the pause, and Live began ~830 ms after the last keystroke, not ~480: docs/benchmarks.md).
The live handler waits until PAUSE_S has passed since the last keystroke (`LiveTyping.wait_for_pause`), and
generates only if its prompt is still the latest one; so one pause makes at most one generation, and a keystroke
during a generation stops it instead of queueing behind it. A run whose prompt is typed on ends at that
keystroke, not when its pause would have ended: the browser sends the deferred run only once the running one is
done, so a stale run that slept out its pause made the last prompt's run start that much late (~70-100 ms over
the pause: the stale answer, the deferred request, the queue). Ending it at once sends the deferred run while the
person is still typing, and the last one is already waiting when the pause ends; the price is a small queued
request per keystroke that comes while a run waits. Chromium then sometimes sends the same text's run twice in
one pause: `LiveTyping.claim_pause` gives a pause one generation, whichever run asks first.

When Live is offered: `LiveGate` keeps the measured backend latency per image of the recent generations of
each setting that changes it (steps, size, precision, guidance on/off); Live is offered for the current
settings when their median is under `--live-max-ms` (default 1000 ms; 0 turns Live off). The first generation
of a setting counts only until the second replaces it (it may include one-off work: tracing a new shape). Until
a generation with those settings has been measured, the page says to press Generate once.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

PAUSE_S = 0.4  # no keystroke for this long is a pause: one live generation
LIVE_SEED = 0  # live images use the Seed control, or this seed when it says random: the picture follows the prompt
RECENT = 5  # latencies kept per settings key, whose median decides


def settings_key(steps, width, height, precision, guidance_scale) -> tuple:
    """What a generation's latency depends on (beside the prompt, which does not change it)."""
    try:
        cfg = float(guidance_scale) > 1.0
    except (TypeError, ValueError):
        cfg = True
    return (int(steps), int(width), int(height), str(precision), cfg)


@dataclass(frozen=True)
class LiveDecision:
    """Whether Live is offered for some settings, and the sentence the page shows about it."""

    offered: bool
    note: str


class LiveGate:
    """Measured latency per settings key (app-wide: it is the backend's speed), and the Live decision."""

    def __init__(self, max_ms: float):
        self.max_ms = max_ms
        self._latencies: dict[tuple, deque[float]] = {}
        self._warm: set[tuple] = set()  # keys measured more than once
        self._lock = threading.Lock()

    def record(self, key: tuple, ms_per_image: float) -> None:
        """One generation's backend latency per image for its settings. The first one of a key counts only until
        the second comes: it may hold one-off work (--optimize trace's graph for a new shape, a first Neuron run)."""
        with self._lock:
            recent = self._latencies.setdefault(key, deque(maxlen=RECENT))
            if key not in self._warm and recent:
                recent.clear()
                self._warm.add(key)
            recent.append(ms_per_image)

    def median_ms(self, key: tuple) -> float | None:
        """The median of the recent latencies for the settings, or None before the first."""
        with self._lock:
            recent = list(self._latencies.get(key, ()))
        return statistics.median(recent) if recent else None

    def decide(self, key: tuple) -> LiveDecision:
        """Live offered (or not) for these settings, with the reason in words."""
        if self.max_ms <= 0:
            return LiveDecision(False, "Live is turned off on this server (--live-max-ms 0).")
        limit = f"{self.max_ms / 1000:.1f} s" if self.max_ms >= 1000 else f"{self.max_ms:.0f} ms"
        median = self.median_ms(key)
        if median is None:
            return LiveDecision(False, f"Live (an image on every pause in typing) needs a generation under {limit}: "
                                       f"press Generate once with these settings to measure it.")
        took = f"{median / 1000:.1f} s" if median >= 1000 else f"{median:.0f} ms"
        if median >= self.max_ms:
            return LiveDecision(False, f"A generation takes {took} here with these settings; Live needs under "
                                       f"{limit}. Fewer steps or a smaller size may get there.")
        return LiveDecision(True, f"A generation takes {took} here: Live makes an image on every pause in typing "
                                  f"({PAUSE_S * 1000:.0f} ms), with these settings, one image, no previews, and the "
                                  f"Seed (or seed {LIVE_SEED} when it is random) so the picture follows the prompt.")


class LiveTyping:
    """Per session: when the prompt was last typed in, and its text then; and the live runs waiting for its pause,
    woken by the next keystroke."""

    def __init__(self):
        self._last: dict[str, tuple[float, str]] = {}
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._served: dict[str, float] = {}  # the keystroke whose pause has had its generation
        self._lock = threading.Lock()

    def typed(self, session: str, prompt: str) -> bool:
        """A keystroke: the prompt is now `prompt`, and the session's waiting runs are woken (from any thread).
        False, and the time kept, when that is the text already noted (the browser repeats the input event with
        the deferred live run; see the module's docstring)."""
        with self._lock:
            last = self._last.get(session)
            if last is not None and last[1] == prompt:
                return False
            self._last[session] = (time.monotonic(), prompt)
            waiting = self._waiting.pop(session, set())
        for loop, woken in waiting:
            loop.call_soon_threadsafe(_wake, woken)
        return True

    async def wait_for_pause(self, session: str, prompt: str) -> bool:
        """Wait until the session has typed nothing for PAUSE_S: True if `prompt` is then still the latest; False
        at the first keystroke that makes it stale (at once, not when the pause would have ended)."""
        loop = asyncio.get_running_loop()
        while self.is_latest(session, prompt):
            wait_s = PAUSE_S - self.quiet_for_s(session)
            if wait_s <= 0:
                return True
            woken = loop.create_future()
            entry = (loop, woken)
            with self._lock:
                self._waiting.setdefault(session, set()).add(entry)
            try:
                if self.is_latest(session, prompt):  # no keystroke between the check above and the registration
                    await asyncio.wait({woken}, timeout=wait_s)
            finally:
                with self._lock:
                    self._waiting.get(session, set()).discard(entry)
                woken.cancel()
        return False

    def claim_pause(self, session: str, prompt: str) -> bool:
        """The pause after the last keystroke takes one generation: True for the first run to claim it (with the
        latest prompt), False for any other. The browser can send the same text's run twice in one pause (a
        deferred run re-dispatched as the one before it ended at a keystroke, seen in Chromium with 20 ms keys);
        without a keystroke noted (an API caller), every run may generate."""
        with self._lock:
            last = self._last.get(session)
            if last is None:
                return True
            if last[1] != prompt or self._served.get(session) == last[0]:
                return False
            self._served[session] = last[0]
            return True

    def quiet_for_s(self, session: str) -> float:
        """Seconds since the session's last keystroke (a large number before the first)."""
        with self._lock:
            at, _ = self._last.get(session, (-float("inf"), ""))
        return time.monotonic() - at

    def is_latest(self, session: str, prompt: str) -> bool:
        """Whether `prompt` is the session's prompt as last typed (True before any keystroke was noted)."""
        with self._lock:
            last = self._last.get(session)
        return last is None or last[1] == prompt

    def forget(self, session: str) -> None:
        """Drop a session's record (tests; sessions are few and small otherwise)."""
        with self._lock:
            self._last.pop(session, None)
            self._waiting.pop(session, None)
            self._served.pop(session, None)


def _wake(woken: asyncio.Future) -> None:
    """On the waiting run's loop: wake it (unless it has stopped waiting)."""
    if not woken.done():
        woken.set_result(None)
