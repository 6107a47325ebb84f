"""What the app adds to a generation, against Gradio's own floor, through Gradio's HTTP API.

    python -m benchmarks.floor [--runs 30] [--warmup 5] [--profile] [--markdown FILE] [--json FILE]

Two servers, started side by side and called alternately, one request at a time:

  app    app.py's own Blocks and handlers (app.build_demo) around InstantBackend: a benchmark-only
         stand-in that returns ready 64x64 images with their infotext and plausible timings at once,
         so what is measured is the app's own time, not a model's
  bare   a plain gr.Blocks with the same 16 API inputs (the generate endpoint's, the hires fix's
         included) and the same outputs (gr.Gallery(format="png"), gr.JSON, gr.State), whose handler
         returns a PNG already written in Gradio's cache and a small dict: Gradio's floor

Each request is what a browser's queue or curl does: POST /gradio_api/call/generate, read the event
stream to `complete`, download the PNG, on one keep-alive httpx client. The client's three phases
(post, stream, download) are timed apart; with --profile both servers also time Gradio's own
stages (process_api, preprocess, the handler, postprocess) and the app its handler's parts (the
backend call, the thread hops, the PNG files, the details), on the same monotonic clock as the client.

    python -m benchmarks.floor --serve app|bare --port PORT [--stamps FILE]   # one server (used by the above)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend import Settings  # noqa: E402
from backend.core.api import (  # noqa: E402
    HR_UPSCALERS,
    MODES,
    RANDOM_SEED,
    Capabilities,
    GenerationResult,
    Timings,
    random_seed,
)
from backend.core.schedulers import DEFAULT_SCHEDULER  # noqa: E402 - light: names only
from benchmarks.gradio_http import generate_inputs, post_call, read_answer  # noqa: E402
from benchmarks.page import CHROMIUM_ARGS, DEFAULT_CHROMIUM, open_app, set_slider  # noqa: E402
from benchmarks.procs import free_port, run_process  # noqa: E402

PROMPT = "a lovely cat"
SIZE = 64
STEPS = 1


class InstantBackend:
    """Benchmark-only stand-in, declared as such: it validates the request as every backend does, then returns
    ready images of the request's size with the real infotext and made-up but plausible timings, at once."""

    name = "instant"

    def __init__(self) -> None:
        self._caps = Capabilities(backend="instant", model="instant (benchmark stand-in)", device="cpu",
                                  precisions=("fp32", "bf16"), previews=True, modes=MODES, hr_upscalers=HR_UPSCALERS,
                                  default_size=(SIZE, SIZE))
        self._pictures: dict[tuple[int, int], Any] = {}

    def capabilities(self):
        """What the app builds its page from: every mode and control, previews on."""
        return self._caps

    def generate(self, request, on_step=None, on_preview=None):
        """A GenerationResult like a real backend's: validated request, seeds, labelled images, timings."""
        from PIL import Image

        from backend.core.metadata import label_images  # PIL: only in the servers and the stand-in's own test

        t0 = time.perf_counter()
        request = request.validated(self._caps)
        request = dataclasses.replace(request, seed=random_seed() if request.seed == RANDOM_SEED else request.seed)
        seeds = request.image_seeds(request.seed)
        width, height = request.output_size
        if (width, height) not in self._pictures:
            self._pictures[width, height] = Image.new("RGB", (width, height), (200, 120, 60))
        images = [self._pictures[width, height].copy() for _ in seeds]
        steps = request.steps
        for step in range(1, steps + 1):
            if on_step is not None:
                on_step(step, steps)
        total_ms = (time.perf_counter() - t0) * 1000.0
        timings = Timings(total_ms=total_ms, text_encoder_ms=0.0, denoise_ms=0.0, step_ms=[0.0] * steps, vae_ms=0.0)
        images = label_images(images, request, seeds, self._caps.model, self.name, total_ms)
        return GenerationResult(images=images, seeds=seeds, timings=timings, request=request, backend=self.name,
                                model=self._caps.model)

    def close(self) -> None:
        """Nothing to free."""


def bare_demo():
    """Gradio's floor: the same inputs and outputs as the app's /generate, a handler that returns a ready PNG."""
    import gradio as gr
    from PIL import Image

    from backend.core.metadata import attach, png_bytes  # PIL, as gradio: only in the bare server

    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio") / "bare"
    cache.mkdir(parents=True, exist_ok=True)
    # The PNG encoded once; each answer is a new file of those bytes inside Gradio's cache (as the app's OutputStore
    # writes: no hash and copy), so a page fetches each picture as it does the app's new files (one URL answered
    # twice comes from the browser's cache at once, which made the bare page's Chromium figure ~25 ms too low).
    ready = png_bytes(attach(Image.new("RGB", (SIZE, SIZE), (200, 120, 60)), "a lovely cat\nSteps: 1"))
    turn = itertools.count()

    def generate(*values):
        png = cache / f"ready-{next(turn)}.png"
        png.write_bytes(ready)
        return [str(png)], {"seeds": [values[5]], "timings": {"total_ms": 0.0}}, None

    with gr.Blocks(analytics_enabled=False) as demo:
        inputs = [gr.Textbox(), gr.Textbox(), gr.Slider(1, 100), gr.Dropdown(["fp32", "bf16"]), gr.Slider(0, 30),
                  gr.Number(), gr.Dropdown([DEFAULT_SCHEDULER]), gr.Slider(64, 1024), gr.Slider(64, 1024),
                  gr.Slider(1, 4), gr.Checkbox(), gr.State(None), gr.Checkbox(), gr.Slider(1, 2),
                  gr.Dropdown(["latent"]), gr.Slider(0, 100), gr.Slider(0, 1)]
        outputs = [gr.Gallery(format="png"), gr.JSON(), gr.State(None)]
        gr.Button().click(generate, inputs=inputs, outputs=outputs, preprocess=False, concurrency_id="generate",
                          api_name="generate")
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


class Stamps:
    """Server side of --profile: (name, start, end) on the monotonic clock, one JSON line each."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)

    def add(self, name: str, t0: float, t1: float) -> None:
        """Record one stage."""
        self._file.write(json.dumps([name, t0, t1]) + "\n")

    def wrap_async(self, owner: Any, attr: str, name: str) -> None:
        """Time every call of an async method."""
        original = getattr(owner, attr)

        async def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.add(name, t0, time.perf_counter())
        setattr(owner, attr, timed)

    def wrap_sync(self, owner: Any, attr: str, name: str) -> None:
        """Time every call of a plain method or function."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, t0, time.perf_counter())
        setattr(owner, attr, timed)


def _hop_owner(fn: Any) -> str:
    """Whose thread hop a to_thread.run_sync call is: the app's own work, or one of Gradio's."""
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", "?")
    if "Handlers._run" in name or "_generate_and_save" in name or "Stamps." in name:
        return "the app's: generation and PNG files"
    if name.startswith("Handlers."):
        return "Gradio's: calling the async generator function"
    if name.startswith("bare_demo."):
        return "Gradio's: calling the sync handler"
    return "Gradio's: the rest (login check, postprocess, file serving)"


def instrument(stamps: Stamps, app: bool) -> None:
    """Time Gradio's stages, and in the app the handler's parts (patched from outside; the product is unchanged)."""
    import anyio.to_thread
    from gradio.blocks import Blocks
    from gradio.state_holder import SessionState

    stamps.wrap_async(Blocks, "process_api", "gradio process_api")
    stamps.wrap_async(Blocks, "preprocess_data", "gradio preprocess")
    stamps.wrap_async(Blocks, "call_function", "handler (gradio call_function)")
    stamps.wrap_async(Blocks, "postprocess_data", "gradio postprocess")
    stamps.wrap_sync(SessionState, "__init__", "gradio SessionState() (a new session's state)")
    original = anyio.to_thread.run_sync

    async def run_sync(fn, *args, **kwargs):
        # The hop into the worker thread and the hop back, apart from the work done there.
        t0 = time.perf_counter()
        inside: list[float] = []

        def there(*a):
            inside.append(time.perf_counter())
            try:
                return fn(*a)
            finally:
                inside.append(time.perf_counter())
        try:
            return await original(there, *args, **kwargs)
        finally:
            t1 = time.perf_counter()
            if len(inside) == 2:
                owner = _hop_owner(fn)
                stamps.add(f"thread hops in + out, {owner}", t0, inside[0])
                stamps.add(f"thread hops in + out, {owner}", inside[1], t1)
    anyio.to_thread.run_sync = run_sync
    if not app:
        return
    from ui.outputs import OutputStore  # PIL: only in the app server

    stamps.wrap_sync(InstantBackend, "generate", "backend.generate")
    stamps.wrap_sync(OutputStore, "save", "OutputStore.save (PNG file)")
    stamps.wrap_sync(GenerationResult, "details", "result.details()")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(kind: str, port: int, stamps_path: str | None) -> None:
    """Run one server (app or bare) until terminated."""
    logging.basicConfig(level=logging.WARNING)
    if stamps_path:
        instrument(Stamps(stamps_path), kind == "app")
    if kind == "app":
        from app import build_demo  # gradio and the whole app: only in the app server

        demo = build_demo(InstantBackend(), Settings(backend="local", port=port))
    else:
        demo = bare_demo()
    signal.signal(signal.SIGTERM, _interrupt)  # run_process's terminate(): unwind, so the files go
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False, quiet=True)
    finally:
        if kind == "app":
            demo.sd_outputs.close()


def call(http, seed: int, session_hash: str | None = None) -> dict[str, float]:
    """One request through Gradio's HTTP API: perf_counter stamps of its phases and the app's own figures.

    session_hash None: a new Gradio session per call (curl's way); else that session's (a browser page's way)."""
    body: dict[str, Any] = {"data": generate_inputs(PROMPT, seed, STEPS, SIZE)}
    if session_hash:
        body["session_hash"] = session_hash
    t0 = time.perf_counter()
    event_id = post_call(http, body)
    t_post = time.perf_counter()
    gallery, details = read_answer(http, event_id)[:2]
    t_complete = time.perf_counter()
    for item in gallery:
        http.get(item["image"]["url"]).raise_for_status()
    t_done = time.perf_counter()
    return {"t0": t0, "t_post": t_post, "t_complete": t_complete, "t_done": t_done,
            "total_ms": (t_done - t0) * 1000.0, "post_ms": (t_post - t0) * 1000.0,
            "stream_ms": (t_complete - t_post) * 1000.0, "download_ms": (t_done - t_complete) * 1000.0,
            "app_ms": float(details.get("app_ms", 0.0))}


# In the page: click the button, resolve with the milliseconds until a new picture in the gallery has loaded.
CLICK_TO_PICTURE = """(button) => new Promise((resolve) => {
  const pictures = () => document.querySelectorAll('button.thumbnail-item img');
  const seen = new Set([...pictures()].map((img) => img.src));
  const t0 = performance.now();
  const watch = new MutationObserver(() => {
    for (const img of pictures()) {
      if (seen.has(img.src)) continue;
      seen.add(img.src);
      const done = () => { watch.disconnect(); resolve(performance.now() - t0); };
      if (img.complete && img.naturalWidth) done(); else img.addEventListener('load', done, {once: true});
      return;
    }
  });
  watch.observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
  button.click();
})"""


def browser_rounds(urls: dict[str, str], rounds: int, warmup: int, pause: float,
                   chromium: str = DEFAULT_CHROMIUM) -> dict[str, list[float]]:
    """Chromium: each server's page, its button clicked in turn (the app's Generate with the prompt typed and 1
    step; the bare page's Run), timed in the page from the click to the new picture loaded in the gallery."""
    from playwright.sync_api import sync_playwright  # a browser driver: only with --browser

    times: dict[str, list[float]] = {server: [] for server in urls}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        buttons = {}
        for server, url in urls.items():
            page = browser.new_page()
            if server == "app":
                open_app(page, url)
                page.get_by_label("Prompt", exact=True).fill(PROMPT)
                set_slider(page, "Steps", STEPS)
                button = page.get_by_role("button", name="Generate")
            else:
                page.goto(url)
                button = page.get_by_role("button", name="Run")
            button.wait_for(timeout=60_000)
            buttons[server] = (page, button.element_handle())
        servers = list(urls)
        for round_ in range(warmup + rounds):
            for server in (servers if round_ % 2 == 0 else servers[::-1]):
                time.sleep(pause)
                page, button = buttons[server]
                ms = page.evaluate(CLICK_TO_PICTURE, button)
                if round_ >= warmup:
                    times[server].append(ms)
        browser.close()
    return times


def stage_medians(calls: list[dict[str, float]], stamps_path: Path) -> dict[str, float]:
    """Each server stage's median per request (summed within a request), from the stamps inside its window."""
    per_request: list[dict[str, float]] = [{} for _ in calls]
    spans: list[list[float]] = [[] for _ in calls]  # each request's process_api calls (one per value yielded)
    if stamps_path.exists():
        for line in stamps_path.read_text().splitlines():
            name, t0, t1 = json.loads(line)
            for i, c in enumerate(calls):
                if c["t0"] <= t0 <= c["t_done"]:
                    per_request[i][name] = per_request[i].get(name, 0.0) + (t1 - t0) * 1000.0
                    if name == "gradio process_api":
                        spans[i] += [t0, t1]
                    break
    for c, r, span in zip(calls, per_request, spans):
        if span:  # the queue: from the POST sent to the event's first processing; then from its last to the client
            r["queue (POST sent -> first process_api)"] = (min(span) - c["t0"]) * 1000.0
            r["first process_api -> last one's end"] = (max(span) - min(span)) * 1000.0
            r["last process_api end -> complete read"] = (c["t_complete"] - max(span)) * 1000.0
            r["process_api calls"] = len(span) / 2
    names = sorted({n for r in per_request for n in r})
    return {n: statistics.median([r.get(n, 0.0) for r in per_request]) for n in names}


def main(argv: list[str] | None = None) -> int:
    """Start both servers, alternate requests between them, print (and optionally write) the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="measured requests to each server (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests to each first (default 5)")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between two requests (default 0.1)")
    parser.add_argument("--profile", action="store_true", help="also time each server's stages")
    parser.add_argument("--browser", action="store_true",
                        help="also click each server's page in Chromium (Debian's, benchmarks/page.py) as many times")
    parser.add_argument("--chromium", default=DEFAULT_CHROMIUM, help=f"Chromium's path (default {DEFAULT_CHROMIUM})")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    parser.add_argument("--serve", choices=("app", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.stamps)
        return 0

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="sd-floor-"))
    servers = ("app", "bare")
    # Each server called two ways: a new Gradio session per call (curl's way, and gradio_client's per Client), and
    # one session for every call (a browser page's way: Gradio builds a session's state once, on its first call).
    variants = [(server, session) for session in ("new", "kept") for server in servers]
    calls: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        clients = {}
        for server in servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            env = {"GRADIO_TEMP_DIR": str(tmp / f"gradio-{server}"), "GRADIO_ANALYTICS_ENABLED": "False",
                   "HF_HUB_OFFLINE": "1"}
            cmd = ["-m", "benchmarks.floor", "--serve", server, "--port", str(port)]
            if args.profile:
                cmd += ["--stamps", str(tmp / f"stamps-{server}.jsonl")]
            stack.enter_context(run_process(cmd, url, env, log_path=tmp / f"{server}.log"))
            clients[server] = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        for round_ in range(args.warmup + args.runs):
            for server, session in (variants if round_ % 2 == 0 else variants[::-1]):
                time.sleep(args.pause)
                result = call(clients[server], 1000 + round_, f"bench-{server}" if session == "kept" else None)
                if round_ >= args.warmup:
                    calls[server, session].append(result)
        print(f"{args.runs} requests each after {args.warmup} warm-up", file=sys.stderr)
        clicks = browser_rounds({server: str(clients[server].base_url) for server in servers}, args.runs,
                                args.warmup, args.pause, args.chromium) if args.browser else {}

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for variant in variants:
        c = calls[variant]
        rows[variant] = r = {k: statistics.median([x[k] for x in c]) for k in ("total_ms", "post_ms", "stream_ms",
                                                                                "download_ms", "app_ms")}
        r["min_ms"] = min(x["total_ms"] for x in c)
        r["n"] = len(c)
        r["stages"] = stage_medians(c, tmp / f"stamps-{variant[0]}.jsonl") if args.profile else {}
        r["raw_ms"] = [x["total_ms"] for x in c]
    names = {"app": "app.py's Blocks and handlers, InstantBackend", "bare": "bare gr.Blocks, ready PNG (the floor)"}
    sessions = {"new": "a new session per call", "kept": "one session for all calls"}
    lines = ["| server | Gradio session | n | median ms | min ms | ratio to bare | POST ms | stream to complete ms | "
             "PNG download ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for server, session in variants:
        r, floor = rows[server, session], rows["bare", session]["total_ms"]
        lines.append(f"| {names[server]} | {sessions[session]} | {r['n']} | {r['total_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['total_ms'] / floor:.2f}x | {r['post_ms']:.1f} | {r['stream_ms']:.1f} | "
                     f"{r['download_ms']:.1f} |")
    if clicks:
        app_ms, bare_ms = (statistics.median(clicks[server]) for server in servers)
        lines += ["", "| Chromium: click -> the new picture loaded in the gallery | n | median ms | min ms | "
                      "ratio to bare |", "|---|---:|---:|---:|---:|"]
        for server, median in zip(servers, (app_ms, bare_ms)):
            lines.append(f"| {names[server]} | {len(clicks[server])} | {median:.1f} | {min(clicks[server]):.1f} | "
                         f"{median / bare_ms:.2f}x |")
            rows[server, "browser"] = {"n": len(clicks[server]), "total_ms": median, "min_ms": min(clicks[server]),
                                       "raw_ms": clicks[server], "stages": {}}
    if args.profile:
        lines += ["", "| stage (median per request, ms) | app, new session | bare, new session | app, one session "
                  "| bare, one session |", "|---|---:|---:|---:|---:|"]
        for stage in sorted({s for v in variants for s in rows[v]["stages"]}):
            cells = [rows[v]["stages"].get(stage) for v in variants]
            lines.append(f"| {stage} | " + " | ".join("" if x is None else f"{x:.2f}" for x in cells) + " |")
    header = (f"{SIZE}x{SIZE}, {STEPS} step, one image, preview off; {args.runs} requests to each server after "
              f"{args.warmup} warm-up, alternating; {os.cpu_count()} CPU cores.\n\n")
    table = header + "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        named = {f"{server}, Chromium" if how == "browser" else f"{server}, {how} session": row
                 for (server, how), row in rows.items()}
        Path(args.json).write_text(json.dumps(named, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
