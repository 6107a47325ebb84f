"""What the live preview costs a generation: the same app with the preview on and off, side by side.

    python -m benchmarks.preview [--runs 30] [--warmup 2] [--steps 50] [--size 512] [--markdown FILE]

One app (`python app.py --model <the tiny model saved as a folder>`), called over Gradio's HTTP API the way a
browser's queue calls it: POST /gradio_api/call/generate, read the event stream, fetch every preview picture the
moment its event arrives (as the page's gallery does) and the final PNG. Round by round the two requests alternate
(preview on first in odd rounds, off first in even ones), so drift of the machine lands on both alike; this is what
separate app processes per path (benchmarks.overhead's (c) and (cn)) cannot give: there, two runs of the same code
differed by up to 40% on a shared 2-core machine, as the app's whole run moved with its neighbours.

Reported per side: the backend's denoising time (the cost lands there: the previews' work shares the cores with
the torch threads), the backend's total and the end-to-end time, with medians and the difference on - off as a
share of the off side's denoising; and the visual rate: previews shown per generation and the time between them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from backend.core.schedulers import DEFAULT_SCHEDULER
from backend.models.tiny import save
from benchmarks.gradio_http import generate_inputs, post_call, stream_events
from benchmarks.procs import run_app

PROMPT = "a lovely cat"
CFG = 7.5


def call(http, preview: bool, seed: int, steps: int, size: int) -> dict:
    """One generation as the page runs it: every preview fetched as it arrives, then the PNG."""
    t0 = time.perf_counter()
    event_id = post_call(http, {"data": generate_inputs(PROMPT, seed, steps, size, CFG, preview)})
    shown_at, answer = [], None
    for event, data in stream_events(http, event_id):
        if event not in ("generating", "complete", "error"):
            continue
        outputs = json.loads(data)
        if event == "error":
            raise RuntimeError(f"the app answered an error: {outputs}")
        gallery = outputs[0] if outputs else None
        # A preview's pictures are captioned "Preview: step N of M"; the result arrives twice (as a last
        # `generating` event, then `complete`), and the page fetches it once.
        is_preview = bool(gallery) and str(gallery[0].get("caption") or "").startswith("Preview")
        if is_preview or event == "complete":
            for item in gallery or []:
                http.get(item["image"]["url"]).raise_for_status()
        if is_preview:
            shown_at.append(time.perf_counter() - t0)
        if event == "complete":
            answer = outputs
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    timings = answer[1]["timings"]
    return {"e2e_ms": elapsed_ms, "backend_ms": timings["total_ms"], "denoise_ms": timings["denoise_ms"],
            "shown_at_s": shown_at}


def summarize(rows: list[dict]) -> dict:
    """Medians of a side's rows; previews per generation and the gaps between them."""
    counts = [len(r["shown_at_s"]) for r in rows]
    gaps = [b - a for r in rows for a, b in zip(r["shown_at_s"], r["shown_at_s"][1:])]
    firsts = [r["shown_at_s"][0] for r in rows if r["shown_at_s"]]
    return {key: statistics.median(r[key] for r in rows) for key in ("e2e_ms", "backend_ms", "denoise_ms")} | {
        "previews": statistics.median(counts), "previews_min": min(counts), "previews_max": max(counts),
        "first_s": statistics.median(firsts) if firsts else None, "gap_s": statistics.median(gaps) if gaps else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="measured rounds, one request each way (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--size", type=int, default=512, help="width and height (default 512)")
    parser.add_argument("--app-arg", action="append", default=[],
                        help="an extra app.py argument (repeat it), e.g. --app-arg=--preview-every=5")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    args = parser.parse_args(argv)

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="sd-preview-"))
    folder = save(tmp / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    sides: dict[bool, list[dict]] = {True: [], False: []}
    with run_app(["--model", str(folder), *args.app_arg], tmp, env=env) as app, \
            httpx.Client(base_url=app.url, timeout=300) as http:
        for round_ in range(args.warmup + args.runs):
            order = (True, False) if round_ % 2 else (False, True)
            for preview in order:
                row = call(http, preview, 1000 + round_, args.steps, args.size)
                if round_ >= args.warmup:
                    sides[preview].append(row)
            done = {p: f"{sides[p][-1]['backend_ms']:.0f} ms" for p in order if sides[p]}
            print(f"round {round_ + 1}/{args.warmup + args.runs}: on {done.get(True, '-')}, off {done.get(False, '-')}",
                  file=sys.stderr)
    on, off = summarize(sides[True]), summarize(sides[False])
    extra_ms = on["denoise_ms"] - off["denoise_ms"]
    lines = [
        "| | preview on | preview off | on - off | share of denoising |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {on[key]:.0f} | {off[key]:.0f} | {on[key] - off[key]:+.0f} | "
          f"{(on[key] - off[key]) / off['denoise_ms'] * 100:+.1f}% |"
          for label, key in (("denoising (ms)", "denoise_ms"), ("backend total (ms)", "backend_ms"),
                             ("end to end (ms)", "e2e_ms"))),
    ]
    first = f"{on['first_s']:.2f} s" if on["first_s"] is not None else "-"
    gap = f"{on['gap_s']:.2f} s" if on["gap_s"] is not None else "-"
    header = (f"Tiny model, {args.size}x{args.size}, {args.steps} steps, CFG {CFG}, {DEFAULT_SCHEDULER}; "
              f"{args.runs} rounds after {args.warmup} warm-up, on and off alternating in one app"
              f"{' (' + ' '.join(args.app_arg) + ')' if args.app_arg else ''}; {os.cpu_count()} CPU cores. "
              f"Medians.\n\n")
    footer = (f"\n\nPreviews shown per generation: median {on['previews']:g} (min {on['previews_min']}, max "
              f"{on['previews_max']}); the first {first} after the request, then one every {gap} (medians). "
              f"The preview's cost: {extra_ms:+.0f} ms, {extra_ms / off['denoise_ms'] * 100:+.1f}% of the denoising.")
    print(header + "\n".join(lines) + footer)
    if args.markdown:
        Path(args.markdown).write_text(header + "\n".join(lines) + footer + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"on": sides[True], "off": sides[False]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
