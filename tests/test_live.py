"""Live mode in-process: when it is offered (measured latency against --live-max-ms), and that typing on stops
the stale generation between steps instead of queueing it (ui/live.py, Handlers.live / live_typing)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

import gradio as gr
import pytest

from backend import Settings
from backend.core.metadata import parse_infotext, read_infotext
from ui.handlers import Handlers, live_key
from ui.live import LiveGate, LiveTyping, settings_key
from ui.outputs import OutputStore

SMALL = dict(steps=2, width=64, height=64, precision="fp32", guidance_scale=7.5)


def key(**kwargs):
    s = {**SMALL, **kwargs}
    return settings_key(s["steps"], s["width"], s["height"], s["precision"], s["guidance_scale"])


def in_own_loop(coroutine):
    """asyncio.run on a thread of its own (Playwright's sync API may hold the main thread's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class Session:
    """What the handlers read of gr.Request."""

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


class Watched:
    """The real backend, with the steps it runs counted and the first one signalled (to type on mid-generation)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.first_step = threading.Event()
        self.steps_run: list[int] = []

    def capabilities(self):
        return self.inner.capabilities()

    def generate(self, request, on_step=None, on_preview=None):
        def counted(step, total):
            self.steps_run.append(step)
            self.first_step.set()
            if on_step is not None:
                on_step(step, total)

        return self.inner.generate(request, on_step=counted, on_preview=on_preview)


def test_the_decision_names_the_measured_latency_and_the_limit():
    gate = LiveGate(max_ms=1000)
    before = gate.decide(key())
    assert not before.offered and "press Generate once" in before.note
    gate.record(key(), 9000.0)  # a first run (tracing a new shape): it counts until the next one replaces it
    assert not gate.decide(key()).offered and "takes 9.0 s here" in gate.decide(key()).note
    gate.record(key(), 2300.0)
    slow = gate.decide(key())
    assert not slow.offered and "takes 2.3 s here" in slow.note and "needs under 1.0 s" in slow.note
    for ms in (120.0, 130.0):  # the median of the recent ones decides: 130 ms
        gate.record(key(), ms)
    fast = gate.decide(key())
    assert fast.offered and "130 ms" in fast.note and gate.median_ms(key()) == 130.0
    assert not gate.decide(key(steps=20)).offered  # other settings: not measured yet
    assert not gate.decide(key(guidance_scale=1.0)).offered  # guidance off is another key (no CFG batch)
    off = LiveGate(max_ms=0)
    off.record(key(), 1.0)
    assert not off.decide(key()).offered and "--live-max-ms 0" in off.decide(key()).note


def test_the_threshold_is_a_setting():
    assert Settings.from_args([]).live_max_ms == 1000.0
    assert Settings.from_args(["--live-max-ms", "250"]).live_max_ms == 250.0
    assert Settings.from_args([], env={"SD_LIVE_MAX_MS": "0"}).live_max_ms == 0.0


def test_a_generate_measures_the_latency_that_decides(tiny_backend, tmp_path):
    """A real generation on the tiny model records its latency; the same settings are then offered under a
    generous limit and refused under a tiny one, with the measured figure in the note."""
    handlers = Handlers(tiny_backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))

    async def generate():
        async for _ in handlers.generate(prompt="a cat", preview=False, **SMALL):
            pass

    in_own_loop(generate())
    measured = handlers.live_gate.median_ms(key())
    assert measured is not None and measured > 0
    assert handlers.live_gate.decide(key()).offered
    handlers.live_gate.max_ms = measured / 2
    assert not handlers.live_gate.decide(key()).offered


def test_typing_on_stops_the_stale_generation_and_the_next_pause_shows_the_new_prompt(tiny_backend, tmp_path,
                                                                                     caplog):
    caplog.set_level(logging.INFO, logger="app")
    backend = Watched(tiny_backend)
    handlers = Handlers(backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))
    long = {**SMALL, "steps": 100}
    for measured in (key(), key(steps=100)):
        handlers.live_gate.record(measured, 1.0)  # offered: the decision itself is tested above
    session = Session("s1")

    async def scenario():
        # A keystroke noted before the stale run checks: typed on during its pause, so it generates nothing.
        handlers.live_typing("a c", session)
        handlers.live_typing("a cat", session)
        assert await handlers.live("a c", True, request=session, **SMALL) == (gr.skip(),) * 3
        assert handlers.live_generations == 0

        # A long generation; a keystroke during it stops it between steps.
        running = asyncio.ensure_future(handlers.live("a cat", True, request=session, **long))
        assert await asyncio.to_thread(backend.first_step.wait, 120)
        handlers.live_typing("a cat in a hat", session)
        stale = await running
        assert stale == (gr.skip(),) * 3
        assert len(backend.steps_run) < 100, "the stale generation ran to its end"

        # The browser's deferred run after the pause: the new prompt's image.
        return await handlers.live("a cat in a hat", True, request=session, **SMALL)

    gallery, details, _ = in_own_loop(scenario())
    assert handlers.live_generations == 2
    [path] = gallery
    infotext = parse_infotext(read_infotext(path))
    assert infotext["prompt"] == "a cat in a hat" and details["seeds"] == [0]  # the random seed: LIVE_SEED
    messages = [r.getMessage() for r in caplog.records if r.name == "app"]
    assert "live generation 1 stopped: the prompt changed" in messages


def test_the_same_text_again_is_no_keystroke(tiny_backend, tmp_path):
    """The browser repeats the prompt's input event when it sends Live's deferred run (ui/live.py): the same text
    is not noted again (the pause is not restarted) and does not stop the session's live generation."""
    typing = LiveTyping()
    assert typing.typed("s", "a cat") and not typing.typed("s", "a cat") and typing.typed("s", "a ca")
    handlers = Handlers(tiny_backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))
    session = Session("s3")
    handlers.live_typing("a cat", session)
    running = handlers.cancels.start(live_key("s3"))
    handlers.live_typing("a cat", session)
    assert not running.is_set()
    handlers.live_typing("a cat!", session)
    assert running.is_set()


def test_a_waiting_run_ends_at_the_keystroke_that_makes_it_stale(tiny_backend, tmp_path, monkeypatch):
    """A live run waiting for its pause ends as soon as its prompt is typed on (from Gradio's worker thread, where
    the unqueued live_typing runs), not when its pause would have ended: the browser sends the deferred run only
    once it is done (ui/live.py). The pause is made a minute long, so a run that slept it out would fail."""
    monkeypatch.setattr("ui.live.PAUSE_S", 60.0)
    handlers = Handlers(tiny_backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))
    handlers.live_gate.record(key(), 1.0)
    session = Session("s4")

    async def scenario():
        handlers.live_typing("a cat", session)
        waiting = asyncio.ensure_future(handlers.live("a cat", True, request=session, **SMALL))
        await asyncio.sleep(0.05)  # it is waiting for the pause
        assert not waiting.done()
        await asyncio.to_thread(handlers.live_typing, "a cat!", session)
        return await asyncio.wait_for(waiting, timeout=30)

    assert in_own_loop(scenario()) == (gr.skip(),) * 3 and handlers.live_generations == 0
    typing = handlers.typing
    assert not typing._waiting.get("s4"), "the ended run left its waiter behind"


def test_a_pause_takes_one_generation_however_often_the_browser_asks():
    """Chromium can send the same text's live run twice in one pause (ui/live.py, claim_pause): the second finds
    the pause served. A keystroke opens a new pause; an API caller that never typed is never refused."""
    typing = LiveTyping()
    typing.typed("s", "a cat")
    assert typing.claim_pause("s", "a cat") and not typing.claim_pause("s", "a cat")
    assert not typing.claim_pause("s", "a ca")  # not the latest prompt
    typing.typed("s", "a cat!")
    assert typing.claim_pause("s", "a cat!")
    assert typing.claim_pause("api", "a dog") and typing.claim_pause("api", "a dog")


def test_the_same_texts_second_run_in_a_pause_generates_nothing(tiny_backend, tmp_path):
    handlers = Handlers(tiny_backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))
    handlers.live_gate.record(key(), 1.0)
    session = Session("s5")
    handlers.live_typing("a fox", session)

    async def scenario():
        first = await handlers.live("a fox", True, request=session, **SMALL)
        return first, await handlers.live("a fox", True, request=session, **SMALL)

    first, again = in_own_loop(scenario())
    assert first[0] and again == (gr.skip(),) * 3 and handlers.live_generations == 1


@pytest.mark.parametrize("live_on, prompt", [(False, "a cat"), (True, "   ")])
def test_live_off_or_an_empty_prompt_generates_nothing(tiny_backend, tmp_path, live_on, prompt):
    handlers = Handlers(tiny_backend, OutputStore(tmp_path), live_gate=LiveGate(max_ms=1e9))
    handlers.live_gate.record(key(), 1.0)
    result = in_own_loop(handlers.live(prompt, live_on, request=Session("s2"), **SMALL))
    assert result == (gr.skip(),) * 3 and handlers.live_generations == 0
