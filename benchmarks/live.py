"""Live in Chromium: from the last keystroke to the live generation's start and to the image on the page.

    python -m benchmarks.live [--rounds 8] [--steps 1] [--size 128] [--markdown FILE] [--json FILE]

The app on the tiny model (`--live-max-ms` raised, so a loaded machine still offers Live), its page in Chromium
(Playwright, benchmarks/page.py): Advanced set to the steps and size, two Generates to measure them (Live is
offered from a measured latency), Live ticked; then, each round, the prompt cleared and `a red fox number N`
typed at 20 ms a key (a burst: closer than the pause), and the round waits for that prompt's image.

Stamps, all on this machine's wall clock (milliseconds):
- the last keystroke: the page's own keydown listener (Date.now() as the key event is dispatched);
- the generation's start and end: the app's log (`live generation N for '...'`, then that request's
  `generated ... in X ms (backend Y ms ...)`; logging's asctime, to the millisecond);
- the image on the page: a MutationObserver on the gallery, when an <img> with a new source is added, and the
  browser has the picture decoded (its load event).

Parts: the pause (ui/live.py's PAUSE_S), the start over the pause, the generation (the handler's own time:
backend and PNG files), and the rest (the answer through Gradio, the browser's fetch and drawing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.page import (
    CHROMIUM_ARGS,
    DEFAULT_CHROMIUM,
    open_advanced,
    open_app,
    session_count,
    small_settings,
    wait_for_result,
)
from benchmarks.procs import run_app
from ui.live import PAUSE_S

# In the page: the last keydown in the prompt, and each gallery picture's arrival (its source and when it loaded).
INSTRUMENT = """(box) => {
  window.__live = {lastKey: 0, images: []};
  box.addEventListener('keydown', () => { window.__live.lastKey = Date.now(); }, true);
  const seen = new Set();
  const note = (img) => {
    if (!img.src || seen.has(img.src)) return;
    seen.add(img.src);
    const at = () => window.__live.images.push({src: img.src, at: Date.now()});
    if (img.complete && img.naturalWidth) at(); else img.addEventListener('load', at, {once: true});
  };
  document.querySelectorAll('button.thumbnail-item img').forEach((img) => seen.add(img.src));
  new MutationObserver(() => document.querySelectorAll('button.thumbnail-item img').forEach(note))
    .observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ app: (.*)$")


def log_events(text: str) -> list[tuple[float, str]]:
    """The app logger's lines: (wall-clock ms, message)."""
    events = []
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found:
            stamp = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp() * 1000.0
            events.append((stamp + int(found.group(2)), found.group(3)))
    return events


def generation_of(events: list[tuple[float, str]], prompt: str) -> dict | None:
    """The live generation for `prompt`: its start, and its end with the handler's and the backend's times."""
    for i, (at, message) in enumerate(events):
        if re.fullmatch(rf"live generation \d+ for {re.escape(repr(prompt))}", message):
            for end_at, end in events[i + 1:]:
                done = re.match(r"request \w+: generated \d+ image\(s\) \(txt2img\) in (\d+) ms \(backend (\d+) ms",
                                end)
                if done:
                    return {"start": at, "end": end_at, "handler_ms": float(done.group(1)),
                            "backend_ms": float(done.group(2))}
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="prompts typed, one pause each (default 8)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (default 1)")
    parser.add_argument("--size", type=int, default=128, help="width and height (default 128)")
    parser.add_argument("--chromium", default=DEFAULT_CHROMIUM, help=f"Chromium's path (default {DEFAULT_CHROMIUM})")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="sd-live-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    rows = []
    with run_app(["--model", "tiny", "--live-max-ms", "600000"], tmp, env=env) as app, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        open_app(page, app.url)
        open_advanced(page)
        small_settings(page, steps=args.steps, size=args.size)
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.fill("measure me")
        for _ in range(2):  # the first run of a size may hold one-off work; Live decides from the second
            before = session_count(page)
            page.get_by_role("button", name="Generate").click()
            wait_for_result(page, before)
        page.wait_for_function("() => !document.querySelector('#live input').disabled", timeout=60_000)
        page.get_by_label("Live: an image on every pause in typing").check()
        page.evaluate(INSTRUMENT, prompt.element_handle())
        for round_ in range(args.rounds):
            prompt.fill("")
            time.sleep(1.0)  # the empty prompt's own run ends, and the page is idle
            images_before = page.evaluate("() => window.__live.images.length")
            text = f"a red fox number {round_ + 1}"
            prompt.press_sequentially(text, delay=20)
            page.wait_for_function("n => window.__live.images.length > n", arg=images_before, timeout=120_000)
            time.sleep(0.3)  # the log line of the request's end is flushed
            stamps = page.evaluate("() => window.__live")
            generation = generation_of(log_events(app.log()), text)
            if generation is None:
                print(f"round {round_ + 1}: no live generation for {text!r} in the log", file=sys.stderr)
                continue
            key = stamps["lastKey"]
            shown = [i["at"] for i in stamps["images"][images_before:] if i["at"] >= generation["start"]]
            if not shown:
                print(f"round {round_ + 1}: no picture after the generation's start", file=sys.stderr)
                continue
            row = {"prompt": text, "start_ms": generation["start"] - key, "handler_ms": generation["handler_ms"],
                   "backend_ms": generation["backend_ms"], "image_ms": shown[0] - key}
            rows.append(row)
            print(f"round {round_ + 1}/{args.rounds}: start +{row['start_ms']:.0f} ms, image +{row['image_ms']:.0f} ms "
                  f"after the last keystroke", file=sys.stderr)
        browser.close()
    if not rows:
        print("no round was measured", file=sys.stderr)
        return 1
    pause_ms = PAUSE_S * 1000.0

    def med(key):
        return statistics.median(r[key] for r in rows)

    start, image, handler = med("start_ms"), med("image_ms"), med("handler_ms")
    lines = [
        "| from the last keystroke | median ms | min | max |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {med(key):.0f} | {min(r[key] for r in rows):.0f} | {max(r[key] for r in rows):.0f} |"
          for label, key in (("the live generation starts", "start_ms"), ("its image is on the page", "image_ms"))),
        "",
        "| part | ms (medians) |",
        "|---|---:|",
        f"| the pause (PAUSE_S) | {pause_ms:.0f} |",
        f"| start over the pause (deferred run, queue, timer) | {start - pause_ms:.0f} |",
        f"| the generation (handler: backend {med('backend_ms'):.0f} ms, PNG files) | {handler:.0f} |",
        f"| the answer to the page (Gradio, fetch, drawing) | {image - start - handler:.0f} |",
    ]
    header = (f"Chromium typing `a red fox number N` at 20 ms a key into the app (tiny model, {args.steps} step(s), "
              f"{args.size}x{args.size}, Live on), {len(rows)} of {args.rounds} rounds measured; "
              f"{os.cpu_count()} CPU cores.\n\n")
    print(header + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text(header + "\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
