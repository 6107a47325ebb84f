"""Throughput of the neuron backend at concurrency 1 and 2 with --neuron-parallel unet and pipeline.

    python -m compile_scripts.compile --model tiny --out /tmp/no-cfg-root --target cpu --dtype fp32 \\
        --sizes 128x128 --no-cfg --parts text_encoder unet vae_decoder vae_post_quant_conv
    python -m benchmarks.parallel --artifacts /tmp/no-cfg-root --steps 4 --size 128 --requests 8

Calls backend.generate from 1 or 2 threads (each sending its requests one after the other, each request
its own prompt and seed, checked in the infotext that comes back) and reports images per second and the
median latency. On a CPU root (the Neuron stand-in) the two lanes share the machine's CPU cores, so the
figures show that the mechanism works (two requests in flight, no mix-ups), not what two NeuronCores do.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend import create_backend  # noqa: E402
from backend.core.api import GenerationRequest  # noqa: E402
from backend.core.metadata import KEY  # noqa: E402
from backend.core.settings import Settings  # noqa: E402


def run(backend, concurrency: int, requests: int, steps: int, size: int) -> dict:
    """`requests` per worker from `concurrency` threads; images/s, median and P95 latency."""
    def worker(user: int) -> list[float]:
        latencies = []
        for index in range(requests):
            seed = user * 1000 + index
            prompt = f"user {user} request {index}"
            req = GenerationRequest(prompt=prompt, steps=steps, seed=seed, precision=backend.capabilities().
                                    default_precision, width=size, height=size, guidance_scale=1.0)
            started = time.perf_counter()
            result = backend.generate(req)
            latencies.append(time.perf_counter() - started)
            info = result.images[0].info[KEY]
            if not info.startswith(prompt) or f"Seed: {seed}," not in info:
                raise AssertionError(f"request {prompt!r} seed {seed} got another's image: {info[:80]!r}")
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [lat for lats in pool.map(worker, range(concurrency)) for lat in lats]
    wall = time.perf_counter() - started
    return {"images_per_s": len(latencies) / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "images": len(latencies)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True, help="a root compiled with --no-cfg (pipeline mode needs it)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrent caller")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    rows = []
    for mode in ("unet", "pipeline"):
        backend = create_backend(Settings(backend="neuron", artifacts=args.artifacts, neuron_parallel=mode,
                                          preview_every=0))
        try:
            for concurrency in (1, 2):
                run(backend, concurrency, 1, args.steps, args.size)  # warm: first calls of each thread
                stats = run(backend, concurrency, args.requests, args.steps, args.size)
                rows.append((mode, concurrency, stats))
                print(f"{mode} x{concurrency}: {stats['images_per_s']:.2f} images/s, P50 {stats['p50_s']:.3f} s, "
                      f"P95 {stats['p95_s']:.3f} s ({stats['images']} images)", flush=True)
        finally:
            backend.close()
    table = ["| --neuron-parallel | concurrency | images/s | P50 (s) | P95 (s) | images |", "|---|---|---|---|---|---|"]
    table += [f"| {m} | {c} | {s['images_per_s']:.2f} | {s['p50_s']:.3f} | {s['p95_s']:.3f} | {s['images']} |"
              for m, c, s in rows]
    print("\n".join(table))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
