"""What the app and the endpoint add on top of a bare diffusers call, measured side by side.

    python -m benchmarks.overhead [--runs 10] [--warmup 2] [--markdown docs/overhead.md]

On one workload (the tiny model saved as a diffusers folder, 512x512, 20 steps, CFG 7.5,
DPM++ 2M) it times:

  (a) bare      StableDiffusionPipeline.from_pretrained(folder)(prompt, ...) -> PIL image
  (b) backend   LocalBackend.generate with the app's defaults (stage timings, infotext)
  (c) app       python app.py --model folder, called through gradio_client (PNG written,
                served and downloaded), with the live preview on (the API's default: the app
                streams pictures of the latents while denoising)
  (cn) app       the same with preview=False (no pictures while denoising). (c) and (cn) run in app
                processes of their own, one after the other, so machine drift lands on one of them: for
                what the preview costs, use benchmarks.preview (on and off alternating in one app)
  (c0) app       the same through a default gradio_client.Client (a new TLS context per call)
  (c1) app       the same app through Gradio's own HTTP API, as curl users call it: POST
                /gradio_api/call/generate, read its event stream, download the PNG (one
                keep-alive httpx client, preview off): what the app adds without gradio_client's polling
  (d) sagemaker python app.py --backend sagemaker -> serving/server.py, through gradio_client

and reports each path's median, its ratio to (a), what it adds to (b), and where the time goes.

How, so that the paths do not skew each other on a small machine:
- (a) and (b) each run in a worker process of their own (two pipelines in one process slowed
  the bare one by ~5%), timed around the call there.
- Each app path runs in a group of its own, [a, b, path], interleaved round by round (the order
  rotated each round, a short pause between calls), with
  only that path's servers started: an idle Gradio app polls its queue every millisecond and
  so steals CPU from whatever else runs (four idle apps made (a) ~25% slower). Its ratio and
  "added to (b)" are against the (a) and (b) of its own group; the (a) and (b) rows pool all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from backend import GenerationRequest, Settings, create_backend
from backend.models.tiny import save
from benchmarks.gradio_http import generate_inputs, post_call, read_answer
from benchmarks.procs import free_port, run_process

PROMPT = "a lovely cat"
STEPS, CFG, SIZE = 20, 7.5, 512


def _worker(kind: str, folder: str, steps: int, size: int, conn) -> None:
    """(a) or (b) in a process of its own: receives seeds, answers (elapsed ms, details) until None."""
    import torch

    if kind == "a":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def run(seed):
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=CFG, height=size, width=size,
                 generator=torch.Generator().manual_seed(seed))
            return {}
    else:
        backend = create_backend(Settings(backend="local", model=folder, device="cpu"))

        def run(seed):
            r = backend.generate(GenerationRequest(PROMPT, steps=steps, guidance_scale=CFG, seed=seed,
                                                   width=size, height=size))
            return {"backend_ms": r.timings.total_ms}
    conn.send("ready")
    while (seed := conn.recv()) is not None:
        t0 = time.perf_counter()
        extra = run(seed)
        conn.send(((time.perf_counter() - t0) * 1000.0, extra))


@contextlib.contextmanager
def _worker_runner(kind: str, folder: Path, steps: int, size: int):
    """A runner for (a) or (b) backed by a _worker process."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(kind, str(folder), steps, size, there), daemon=True)
    proc.start()
    try:
        if not here.poll(600) or here.recv() != "ready":
            raise RuntimeError(f"the ({kind}) worker did not start")

        def run(seed):
            here.send(seed)
            return here.recv()
        yield run
    finally:
        with contextlib.suppress(OSError):
            here.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--paths", default="a,b,c,cn,c1,d",
                        help="which of a,b,c,cn,c0,c1,d to run (default a,b,c,cn,c1,d)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"denoising steps (default {STEPS})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"width and height (default {SIZE})")
    parser.add_argument("--pause", type=float, default=0.2,
                        help="seconds between two calls, so one path's trailing work is not timed in the next "
                             "(default 0.2)")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    steps, size = args.steps, args.size

    import httpx
    from gradio_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="sd-overhead-"))
    folder = save(tmp / "tiny")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-2"}
    os.environ["GRADIO_TEMP_DIR"] = env["GRADIO_TEMP_DIR"]

    # gradio_client builds a new httpx client, and so a new TLS context (25-50 ms of loading CA
    # certificates, even for http://), for every call and every file download unless it is
    # given one to reuse. (c) and (d) reuse one, as a client that cares about latency does;
    # (c0) shows the default.
    shared_tls = ssl.create_default_context()

    def gradio_client_runner(url, reuse_tls=True, preview=True):
        client = Client(url, verbose=False, download_files=str(tmp / "downloads"),
                        ssl_verify=shared_tls if reuse_tls else True)

        def run(seed):
            t0 = time.perf_counter()
            files, details = client.predict(prompt=PROMPT, steps=steps, guidance_scale=CFG, seed=seed,
                                            width=size, height=size, preview=preview, api_name="/generate")
            elapsed = (time.perf_counter() - t0) * 1000.0
            t = details["timings"]
            out = {"backend_ms": t["total_ms"], "png_ms": details.get("app_ms", 0.0)}
            if t.get("server_ms") is not None:
                out["server_ms"] = t["server_ms"]
            return elapsed, out
        return run

    def http_runner(url, http):
        def run(seed):
            t0 = time.perf_counter()
            # Every input of /generate, in order (the positional form must send them all).
            data = generate_inputs(PROMPT, seed, steps, size, CFG)
            gallery, details = read_answer(http, post_call(http, {"data": data}))[:2]
            for item in gallery:
                http.get(item["image"]["url"]).raise_for_status()
            elapsed = (time.perf_counter() - t0) * 1000.0
            return elapsed, {"backend_ms": details["timings"]["total_ms"], "png_ms": details.get("app_ms", 0.0)}
        return run

    @contextlib.contextmanager
    def app_path(p):
        """Start path p's servers; yield its runner; stop them."""
        with contextlib.ExitStack() as stack:
            if p == "d":
                sport = free_port()
                stack.enter_context(run_process(["-m", "serving.server", "--model", str(folder), "--port", str(sport)],
                                                f"http://127.0.0.1:{sport}/ping", env))
                app_args = ["--backend", "sagemaker", "--endpoint-name", "bench", "--endpoint-url",
                            f"http://127.0.0.1:{sport}"]
            else:
                app_args = ["--model", str(folder)]
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            stack.enter_context(run_process(["app.py", *app_args, "--port", str(port)], url, env))
            if p == "c1":
                yield http_runner(url, stack.enter_context(httpx.Client(base_url=url, timeout=300)))
            else:
                yield gradio_client_runner(url, reuse_tls=(p != "c0"), preview=(p != "cn"))

    samples: dict[str, list[float]] = {p: [] for p in paths}
    parts: dict[str, list[dict]] = {p: [] for p in paths}
    group_of: dict[str, dict[str, list[float]]] = {}  # app path -> the (a) and (b) samples of its group
    local = [p for p in ("a", "b") if p in paths]
    app_paths = [p for p in paths if p not in ("a", "b")]
    with contextlib.ExitStack() as stack:
        workers = {p: stack.enter_context(_worker_runner(p, folder, steps, size)) for p in local}
        for app in app_paths or [None]:
            group = [*local, app] if app else local
            own = {p: [] for p in local}
            with app_path(app) if app else contextlib.nullcontext() as app_run:
                runners = {**workers, **({app: app_run} if app else {})}
                for round_ in range(args.warmup + args.runs):
                    # Rotated each round, so no path always runs right after the same other one (a
                    # server's trailing work after its answer would otherwise land on one path).
                    shift = round_ % len(group)
                    for p in group[shift:] + group[:shift]:
                        time.sleep(args.pause)
                        elapsed, extra = runners[p](1000 + round_)
                        if round_ >= args.warmup:
                            samples[p].append(elapsed)
                            parts[p].append(extra)
                            if p in own:
                                own[p].append(elapsed)
                    print(f"[{app or 'a,b'}] round {round_ + 1}/{args.warmup + args.runs}: " +
                          ", ".join(f"{p} {samples[p][-1]:.0f} ms" for p in group if samples[p]), file=sys.stderr)
            if app:
                group_of[app] = own

    names = {"a": "(a) bare diffusers pipeline", "b": "(b) backend.generate",
             "c": "(c) app via gradio_client, live preview", "cn": "(cn) app via gradio_client, preview=False",
             "c0": "(c0) app via gradio_client, default Client()",
             "c1": "(c1) app via Gradio's HTTP API (httpx)", "d": "(d) app -> SageMaker backend -> serving/server.py"}
    def median_of(values):
        return statistics.median(values) if values else None

    rows = []
    for p in paths:
        med = statistics.median(samples[p])
        pool = group_of.get(p, samples)  # an app path against its own group's (a) and (b)
        base, own = median_of(pool.get("a")), median_of(pool.get("b"))
        extra = {k: statistics.median([e[k] for e in parts[p] if k in e]) for k in
                 sorted({k for e in parts[p] for k in e})}
        where = []
        if "backend_ms" in extra and p != "b":
            rest = med - extra.get("server_ms", extra["backend_ms"])
            if "server_ms" in extra:
                where.append(f"endpoint {extra['server_ms']:.0f} ms (its backend {extra['backend_ms']:.0f})")
            else:
                where.append(f"backend {extra['backend_ms']:.0f} ms")
            if "png_ms" in extra:
                where.append(f"PNG files {extra['png_ms']:.1f} ms")
            where.append(f"rest (queue, HTTP, download) {rest - extra.get('png_ms', 0.0):.0f} ms")
        rows.append({"path": names[p], "median_ms": med, "min_ms": min(samples[p]),
                     "ratio": med / base if base else None,
                     "over_b_ms": med - own if own is not None and p not in ("a", "b") else None,
                     "where": "; ".join(where), "raw_ms": samples[p]})
    lines = ["| path | median ms | min ms | ratio to (a) | added to (b), ms | where the time goes |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] else "-"
        over = f"{r['over_b_ms']:+.0f}" if r["over_b_ms"] is not None else ""
        lines.append(f"| {r['path']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {ratio} | {over} | {r['where']} |")
    table = "\n".join(lines)
    header = (f"Tiny model folder, {size}x{size}, {steps} steps, CFG {CFG}, DPM++ 2M; {args.runs} rounds "
              f"after {args.warmup} warm-up; each app path interleaved with (a) and (b) in a group of its own, "
              f"its ratio against that group's (a); {os.cpu_count()} CPU cores.\n\n")
    print(header + table)
    if args.markdown:
        Path(args.markdown).write_text(header + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
