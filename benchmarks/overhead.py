"""What the app and the endpoint add on top of a bare diffusers call, measured side by side.

    python -m benchmarks.overhead [--runs 10] [--warmup 2] [--markdown docs/overhead.md]

On one workload (the tiny model saved as a diffusers folder, 512x512, 20 steps, CFG 7.5,
DPM++ 2M) it times, interleaved round by round so drift hits every path alike:

  (a) bare      StableDiffusionPipeline.from_pretrained(folder)(prompt, ...) -> PIL image
  (b) backend   LocalBackend.generate (stage timings, infotext)
  (c) app       python app.py --model folder, called through gradio_client (PNG written,
                served and downloaded)
  (c0) app       the same through a default gradio_client.Client (a new TLS context per call)
  (c1) app       the same app through Gradio's own HTTP API, as curl users call it: POST
                /gradio_api/call/generate, read its event stream, download the PNG (one
                keep-alive httpx client): what the app adds without gradio_client's polling
  (d) sagemaker python app.py --backend sagemaker -> serving/server.py, through gradio_client

and reports each path's median and its ratio to (a), with where the extra time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procs import free_port, run_process

PROMPT = "a lovely cat"
STEPS, CFG, SIZE = 20, 7.5, 512


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--paths", default="a,b,c,c1,d", help="which of a,b,c,c0,c1,d to run (default a,b,c,c1,d)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"denoising steps (default {STEPS})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"width and height (default {SIZE})")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--markdown", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    steps, size = args.steps, args.size

    import torch
    from diffusers import StableDiffusionPipeline
    import httpx
    from gradio_client import Client

    from backend import GenerationRequest, Settings, create_backend
    from backend.pipeline import device_thread
    from backend.tiny import save

    tmp = Path(tempfile.mkdtemp(prefix="sd-overhead-"))
    folder = save(tmp / "tiny")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-2"}
    os.environ["GRADIO_TEMP_DIR"] = env["GRADIO_TEMP_DIR"]

    samples: dict[str, list[float]] = {p: [] for p in paths}
    parts: dict[str, list[dict]] = {p: [] for p in paths}
    with contextlib.ExitStack() as stack:
        runners = {}
        # (a) and (b) share this process, so both run their torch work on one thread (the backend's own,
        # backend.pipeline.device_thread(): two threads running torch slow each other down by ~40%).
        device = device_thread()
        if "a" in paths:
            pipe = device.run(StableDiffusionPipeline.from_pretrained, folder, safety_checker=None,
                              requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)

            def run_a(seed):
                device.run(pipe, PROMPT, num_inference_steps=steps, guidance_scale=CFG, height=size, width=size,
                           generator=torch.Generator().manual_seed(seed))
                return {}
            runners["a"] = run_a
        if "b" in paths:
            backend = device.run(create_backend, Settings(backend="local", model=str(folder), device="cpu"))

            def run_b(seed):
                r = device.run(backend.generate, GenerationRequest(PROMPT, steps=steps, guidance_scale=CFG,
                                                                   seed=seed, width=size, height=size))
                return {"backend_ms": r.timings.total_ms}
            runners["b"] = run_b

        # gradio_client builds a new httpx client, and so a new TLS context (25-50 ms of loading CA
        # certificates, even for http://), for every call and every file download unless it is
        # given one to reuse. (c) and (d) reuse one, as a client that cares about latency does;
        # (c0) shows the default.
        shared_tls = ssl.create_default_context()

        def app_runner(url, reuse_tls=True):
            client = Client(url, verbose=False, download_files=str(tmp / "downloads"),
                            ssl_verify=shared_tls if reuse_tls else True)

            def run(seed):
                files, details = client.predict(prompt=PROMPT, steps=steps, guidance_scale=CFG, seed=seed,
                                                width=size, height=size, api_name="/generate")
                t = details["timings"]
                out = {"backend_ms": t["total_ms"], "png_ms": details.get("app_ms", 0.0)}
                if t.get("server_ms") is not None:
                    out["server_ms"] = t["server_ms"]
                return out
            return run

        def http_runner(url):
            http = stack.enter_context(httpx.Client(base_url=url, timeout=300))

            def run(seed):
                data = [PROMPT, "", steps, "fp32", CFG, seed, "dpm++2m", size, size, 1]
                event_id = http.post("/gradio_api/call/generate", json={"data": data}).raise_for_status().json()["event_id"]
                event, answer = None, None
                with http.stream("GET", f"/gradio_api/call/generate/{event_id}") as stream:
                    for line in stream.iter_lines():
                        if line.startswith("event:"):
                            event = line.partition(":")[2].strip()
                        elif line.startswith("data:") and event in ("complete", "error"):
                            answer = json.loads(line.partition(":")[2])
                            break
                if event != "complete":
                    raise RuntimeError(f"the app answered {event}: {answer}")
                gallery, details = answer[0], answer[1]
                for item in gallery:
                    http.get(item["image"]["url"]).raise_for_status()
                return {"backend_ms": details["timings"]["total_ms"], "png_ms": details.get("app_ms", 0.0)}
            return run

        if "c1" in paths:
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            stack.enter_context(run_process(["app.py", "--model", str(folder), "--port", str(port)], url, env))
            runners["c1"] = http_runner(url)
        if "c" in paths:
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            stack.enter_context(run_process(["app.py", "--model", str(folder), "--port", str(port)], url, env))
            runners["c"] = app_runner(url)
        if "c0" in paths:
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            stack.enter_context(run_process(["app.py", "--model", str(folder), "--port", str(port)], url, env))
            runners["c0"] = app_runner(url, reuse_tls=False)
        if "d" in paths:
            sport, aport = free_port(), free_port()
            stack.enter_context(run_process(["-m", "serving.server", "--model", str(folder), "--port", str(sport)],
                                         f"http://127.0.0.1:{sport}/ping", env))
            url = f"http://127.0.0.1:{aport}/"
            stack.enter_context(run_process(
                ["app.py", "--backend", "sagemaker", "--endpoint-name", "bench", "--endpoint-url",
                 f"http://127.0.0.1:{sport}", "--port", str(aport)], url, env))
            runners["d"] = app_runner(url)

        for round_ in range(args.warmup + args.runs):
            for p in paths:
                seed = 1000 + round_
                t0 = time.perf_counter()
                extra = runners[p](seed)
                elapsed = (time.perf_counter() - t0) * 1000.0
                if round_ >= args.warmup:
                    samples[p].append(elapsed)
                    parts[p].append(extra)
            print(f"round {round_ + 1}/{args.warmup + args.runs}: " +
                  ", ".join(f"{p} {samples[p][-1]:.0f} ms" for p in paths if samples[p]), file=sys.stderr)

    names = {"a": "(a) bare diffusers pipeline", "b": "(b) backend.generate",
             "c": "(c) app via gradio_client", "c0": "(c0) app via gradio_client, default Client()",
             "c1": "(c1) app via Gradio's HTTP API (httpx)", "d": "(d) app -> SageMaker backend -> serving/server.py"}
    base = statistics.median(samples["a"]) if "a" in samples else None
    own = statistics.median(samples["b"]) if "b" in samples else None  # the app's own backend, in process
    rows = []
    for p in paths:
        med = statistics.median(samples[p])
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
              f"after {args.warmup} warm-up, paths interleaved; {os.cpu_count()} CPU cores.\n\n")
    print(header + table)
    if args.markdown:
        Path(args.markdown).write_text(header + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
