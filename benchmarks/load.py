"""Concurrent users against the app, through gradio_client: latency P50/P95, throughput, and mix-ups.

    python -m benchmarks.load                          # starts python app.py (default model), 8 users x 25
    python -m benchmarks.load --url http://HOST:7860/  # an app already running (--auth user:pass if it asks)
    python -m benchmarks.load --steps 20 --size 512 --users 8 --requests 25 --markdown docs/load.md
    python -m benchmarks.load --app-args "--model tiny" --steps 4 --size 128    # quick, on any CPU

Each user is its own gradio_client.Client (its own session) sending its requests one after the
other. Every request gets its own prompt and seed, and every image that comes back is checked:
the prompt and seed in its PNG infotext must be that request's, so a mix-up between users, a lost
or a duplicated request fails the run. A "queue full" answer counts apart; any other error fails.
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


def run_user(url: str, user: int, requests: int, work: Workload, download_dir: Path,
             auth: tuple[str, str] | None = None, precision: str | None = None) -> list[Outcome]:
    """One client sending its requests one after the other."""
    from gradio_client import Client

    client = Client(url, auth=auth, verbose=False, download_files=str(download_dir / f"user-{user}"))
    outcomes = []
    for index in range(requests):
        prompt, seed = request_of(user, index)
        started = time.perf_counter()
        try:
            gallery, details = client.predict(
                prompt, "", work.steps, precision, work.guidance_scale, seed, work.scheduler,
                work.size, work.size, work.num_images, work.preview, api_name="/generate",
            )
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, and judged by check()
            outcomes.append(Outcome(user, index, prompt, seed, time.perf_counter() - started, [], None,
                                    error=f"{type(exc).__name__}: {exc}", queue_full=is_queue_full(exc)))
            continue
        images = [item["image"] for item in gallery]
        outcomes.append(Outcome(user, index, prompt, seed, time.perf_counter() - started, images, details))
    return outcomes


def run_load(url: str, users: int, requests: int, work: Workload, download_dir: Path,
             auth: tuple[str, str] | None = None) -> tuple[list[Outcome], float]:
    """All users at once; returns every outcome and the wall-clock seconds."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        futures = [pool.submit(run_user, url, u, requests, work, download_dir, auth) for u in range(users)]
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
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)

    work = Workload(steps=args.steps, size=args.size, num_images=args.images, preview=args.preview)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    with tempfile.TemporaryDirectory(prefix="sd-load-") as tmp, contextlib.ExitStack() as stack:
        app_env = {"GRADIO_ANALYTICS_ENABLED": "False"}
        url = args.url or stack.enter_context(run_app(shlex.split(args.app_args), Path(tmp), app_env, timeout=600)).url
        if args.warmup:
            run_user(url, 999, args.warmup, work, Path(tmp) / "warmup", auth)
        outcomes, wall_s = run_load(url, args.users, args.requests, work, Path(tmp) / "downloads", auth)
        problems = check(outcomes, work)
    summary = summarize(outcomes, wall_s, work)
    where = f"app at {args.url}" if args.url else f"python app.py {args.app_args}".strip()
    table = markdown(summary, args.users, args.requests, where)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    for problem in problems[:20]:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
