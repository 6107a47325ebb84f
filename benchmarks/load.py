"""Concurrent users against the app, through gradio_client and Gradio's HTTP API: latency, throughput, mix-ups.

    python -m benchmarks.load                          # starts python app.py (default model), 8 users x 25
    python -m benchmarks.load --url http://HOST:7860/  # an app already running (--auth user:pass if it asks)
    python -m benchmarks.load --steps 20 --size 512 --users 8 --requests 25 --markdown docs/load.md
    python -m benchmarks.load --app-args "--model tiny" --steps 4 --size 128    # quick, on any CPU

Each user is its own client (its own Gradio session) sending its requests one after the other:
gradio_client.Client, or (--clients http) Gradio's own HTTP API as curl and a browser's queue call it (POST
/gradio_api/call/generate, read its event stream, download the PNGs; one keep-alive httpx client per user).
By default both run, one after the other against the same app, and the table gives gradio_client's share
(its P50 minus the HTTP API's) as a column of its own. Every request gets its own prompt and seed, and every
image that comes back is checked: the prompt and seed in its PNG infotext must be that request's, so a mix-up
between users, a lost or a duplicated request fails the run. A "queue full" answer counts apart; any other error fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.core.metadata import parse_infotext, read_infotext  # noqa: E402
from backend.core.schedulers import DEFAULT_SCHEDULER  # noqa: E402 - light: names only
from benchmarks.gradio_http import HIRES_OFF, post_call, read_answer  # noqa: E402
from benchmarks.procs import run_app  # noqa: E402


@dataclasses.dataclass
class Outcome:
    """One request: who sent it, what it asked, how long it took and what came back."""

    user: int
    index: int
    prompt: str
    seed: int
    latency_s: float
    images: list[str]  # local paths of the downloaded PNGs
    details: dict[str, Any] | None
    error: str | None = None
    queue_full: bool = False


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every request asks for."""

    steps: int = 20
    size: int = 512
    num_images: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    guidance_scale: float = 7.5
    preview: bool = False  # a load test measures the result, not the pictures streamed while denoising

    def describe(self) -> str:
        """One line for the report."""
        return (f"{self.size}x{self.size}, {self.steps} steps, {self.num_images} image(s)/request, "
                f"{self.scheduler}, CFG {self.guidance_scale:g}, live preview {'on' if self.preview else 'off'}")


def request_of(user: int, index: int) -> tuple[str, int]:
    """The prompt and seed of a user's index-th request: unique, so every image says whose it is."""
    return f"load user {user} request {index}", 100_000 * (user + 1) + 10 * index


def is_queue_full(exc: BaseException) -> bool:
    """gradio_client's answer when the app's queue is full (QueueError, 'Queue is full')."""
    return type(exc).__name__ == "QueueError" or "queue is full" in str(exc).lower()


CLIENTS = ("gradio_client", "http")


class HttpCaller:
    """One user through Gradio's HTTP API: POST /gradio_api/call/generate, its event stream to `complete`, each PNG
    downloaded; one keep-alive httpx client and one Gradio session (as a gradio_client.Client or a browser page)."""

    def __init__(self, url: str, session_hash: str, download_dir: Path, auth: tuple[str, str] | None = None):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600)
        if auth:
            self.http.post("/login", data={"username": auth[0], "password": auth[1]}).raise_for_status()
        self.session_hash = session_hash
        self.download_dir = download_dir
        download_dir.mkdir(parents=True, exist_ok=True)

    def predict(self, *data: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """/generate's answer, gradio_client's shape: the gallery (each item's image a local path) and the details."""
        # The API's 16 inputs: the hires fix's five last (enable_hr False: off), which gradio_client fills in itself.
        body = {"data": [*data, *HIRES_OFF], "session_hash": self.session_hash}
        event_id = post_call(self.http, body)
        gallery, details = read_answer(self.http, event_id)[:2]
        for k, item in enumerate(gallery):
            path = self.download_dir / f"{event_id}-{k}.png"
            path.write_bytes(self.http.get(item["image"]["url"]).raise_for_status().content)
            item["image"] = str(path)
        return gallery, details

    def close(self) -> None:
        """Close the connection."""
        self.http.close()


def run_user(url: str, user: int, requests: int, work: Workload, download_dir: Path,
             auth: tuple[str, str] | None = None, precision: str | None = None,
             client: str = "gradio_client") -> list[Outcome]:
    """One client (gradio_client, or Gradio's HTTP API: CLIENTS) sending its requests one after the other."""
    if client == "http":
        caller = HttpCaller(url, f"load-user-{user}-{time.monotonic_ns()}", download_dir / f"user-{user}", auth)
        predict, close = caller.predict, caller.close
    else:
        from gradio_client import Client

        gc = Client(url, auth=auth, verbose=False, download_files=str(download_dir / f"user-{user}"))

        def predict(*data):
            return gc.predict(*data, api_name="/generate")
        close = gc.close
    outcomes = []
    try:
        for index in range(requests):
            prompt, seed = request_of(user, index)
            started = time.perf_counter()
            try:
                gallery, details = predict(prompt, "", work.steps, precision, work.guidance_scale, seed,
                                           work.scheduler, work.size, work.size, work.num_images, work.preview)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, and judged by check()
                outcomes.append(Outcome(user, index, prompt, seed, time.perf_counter() - started, [], None,
                                        error=f"{type(exc).__name__}: {exc}", queue_full=is_queue_full(exc)))
                continue
            images = [item["image"] for item in gallery]
            outcomes.append(Outcome(user, index, prompt, seed, time.perf_counter() - started, images, details))
    finally:
        close()
    return outcomes


def run_load(url: str, users: int, requests: int, work: Workload, download_dir: Path,
             auth: tuple[str, str] | None = None, client: str = "gradio_client") -> tuple[list[Outcome], float]:
    """All users at once; returns every outcome and the wall-clock seconds."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        futures = [pool.submit(run_user, url, u, requests, work, download_dir, auth, None, client)
                   for u in range(users)]
        outcomes = [o for f in futures for o in f.result()]
    return outcomes, time.perf_counter() - started


def check(outcomes: list[Outcome], work: Workload) -> list[str]:
    """Problems: errors other than queue full, wrong or missing images, mix-ups, duplicates."""
    problems = []
    seen_files: set[str] = set()
    seen_images: set[tuple[str, str]] = set()
    for o in outcomes:
        who = f"user {o.user} request {o.index}"
        if o.error is not None:
            if not o.queue_full:
                problems.append(f"{who}: {o.error}")
            continue
        if len(o.images) != work.num_images:
            problems.append(f"{who}: {len(o.images)} images, asked for {work.num_images}")
        expected_seeds = [o.seed + k for k in range(work.num_images)]
        if not o.details or o.details.get("seeds") != expected_seeds:
            problems.append(f"{who}: details seeds {o.details and o.details.get('seeds')} != {expected_seeds}")
        for k, path in enumerate(o.images):
            if path in seen_files:
                problems.append(f"{who}: file {path} was also returned to another request")
            seen_files.add(path)
            info = parse_infotext(read_infotext(path))
            got = (info["prompt"], info["params"].get("Seed"))
            if got != (o.prompt, str(o.seed + k)):
                problems.append(f"{who}: image {k} belongs to {got}, not {(o.prompt, o.seed + k)}")
            if got in seen_images:
                problems.append(f"{who}: image {got} came back twice")
            seen_images.add(got)
    return problems


def summarize(outcomes: list[Outcome], wall_s: float, work: Workload) -> dict[str, Any]:
    """Counts, latency percentiles of the completed requests, requests/s and images/s."""
    done = [o.latency_s for o in outcomes if o.error is None]
    images = sum(len(o.images) for o in outcomes if o.error is None)
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "queue_full": sum(o.queue_full for o in outcomes),
        "failed": sum(o.error is not None and not o.queue_full for o in outcomes),
        "wall_s": wall_s,
        "p50_s": float(np.percentile(done, 50)) if done else None,
        "p95_s": float(np.percentile(done, 95)) if done else None,
        "max_s": max(done) if done else None,
        "requests_per_s": len(done) / wall_s if wall_s > 0 else None,
        "images_per_s": images / wall_s if wall_s > 0 else None,
        "workload": work.describe(),
    }


def markdown(summary: dict[str, Any], users: int, requests: int, where: str) -> str:
    """The summary as a Markdown table for docs/benchmarks.md."""
    def s(v):
        return "-" if v is None else f"{v:.2f}"

    return "\n".join([
        f"Load: {users} concurrent gradio_client users x {requests} requests, {summary['workload']}; {where}.",
        "",
        "| requests | completed | queue full | failed | P50 (s) | P95 (s) | max (s) | requests/s | images/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['requests']} | {summary['completed']} | {summary['queue_full']} | {summary['failed']} "
        f"| {s(summary['p50_s'])} | {s(summary['p95_s'])} | {s(summary['max_s'])} "
        f"| {s(summary['requests_per_s'])} | {s(summary['images_per_s'])} |",
    ])


def compare_markdown(summaries: dict[str, dict[str, Any]], users: int, requests: int, where: str) -> str:
    """One row per client (CLIENTS) against the same app; gradio_client's share: its P50 minus the HTTP API's."""
    def s(v):
        return "-" if v is None else f"{v:.3f}"

    first = next(iter(summaries.values()))
    http_p50 = summaries.get("http", {}).get("p50_s")
    lines = [f"Load: {users} concurrent users x {requests} requests per client, {first['workload']}; {where}.", "",
             "| client | requests | completed | queue full | failed | P50 (s) | P95 (s) | requests/s | "
             "gradio_client's share of P50 (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"gradio_client": "gradio_client.Client.predict", "http": "Gradio's HTTP API (httpx, event stream)"}
    for client, summary in summaries.items():
        share = (summary["p50_s"] - http_p50 if client == "gradio_client" and http_p50 is not None
                 and summary["p50_s"] is not None else None)
        lines.append(f"| {names[client]} | {summary['requests']} | {summary['completed']} | {summary['queue_full']} "
                     f"| {summary['failed']} | {s(summary['p50_s'])} | {s(summary['p95_s'])} "
                     f"| {s(summary['requests_per_s'])} | {'' if share is None else f'{share:+.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the load and print the Markdown table; exit 1 if any request was lost or mixed up."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an app already running (default: start python app.py here)")
    parser.add_argument("--app-args", default="", help="flags for the app this script starts, e.g. '--model tiny'")
    parser.add_argument("--auth", help="user:password of an app started with --auth")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per user")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--preview", action="store_true", help="ask for the live preview too (default: off)")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="gradio_client, http (Gradio's HTTP API) or both, run one after the other "
                             "(default: both)")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients or set(clients) - set(CLIENTS):
        parser.error(f"--clients: choose from {', '.join(CLIENTS)}")

    work = Workload(steps=args.steps, size=args.size, num_images=args.images, preview=args.preview)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    summaries, problems = {}, []
    with tempfile.TemporaryDirectory(prefix="sd-load-") as tmp, contextlib.ExitStack() as stack:
        app_env = {"GRADIO_ANALYTICS_ENABLED": "False"}
        url = args.url or stack.enter_context(run_app(shlex.split(args.app_args), Path(tmp), app_env, timeout=600)).url
        for client in clients:
            if args.warmup:
                run_user(url, 999, args.warmup, work, Path(tmp) / client / "warmup", auth, client=client)
            outcomes, wall_s = run_load(url, args.users, args.requests, work, Path(tmp) / client / "downloads", auth,
                                        client=client)
            problems += [f"{client}: {p}" for p in check(outcomes, work)]
            summaries[client] = summarize(outcomes, wall_s, work)
    where = f"app at {args.url}" if args.url else f"python app.py {args.app_args}".strip()
    table = compare_markdown(summaries, args.users, args.requests, where)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    for problem in problems[:20]:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
