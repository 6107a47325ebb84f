"""Latency statistics, throughput and cost: shared by the app's latency panel and the benchmarks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with numpy's default (linear) method, as the walk-through computes P95."""
    if not len(values):
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def qps(requests: int, wall_seconds: float) -> float:
    """Requests completed per second of wall-clock time."""
    if wall_seconds <= 0:
        raise ValueError("wall_seconds must be positive")
    return requests / wall_seconds


def cost_per_10k_images(price_per_hour: float, images_per_second: float) -> float:
    """Dollars to make 10,000 images at this throughput on an instance billed per hour.

    The walk-through's row: $1.966/h at 1.116 images/s -> 1.966 / 3600 / 1.116 * 10000 = $4.89.
    """
    if images_per_second <= 0:
        raise ValueError("images_per_second must be positive")
    return price_per_hour / 3600.0 / images_per_second * 10_000


@dataclass(frozen=True)
class Summary:
    """A snapshot of a LatencyStats."""

    count: int
    images: int
    p50_ms: float | None
    p95_ms: float | None
    images_per_s: float | None


class LatencyStats:
    """Thread-safe record of request latencies (ms) and image counts, bounded to the last `window`."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self._window = window
        self._latencies: list[float] = []
        self._images: list[int] = []

    def add(self, latency_ms: float, images: int = 1) -> None:
        """Record one request."""
        with self._lock:
            self._latencies.append(float(latency_ms))
            self._images.append(int(images))
            if len(self._latencies) > self._window:
                del self._latencies[0], self._images[0]

    def summary(self) -> Summary:
        """Count, P50, P95 and images per second of generation time."""
        with self._lock:
            lat, imgs = list(self._latencies), list(self._images)
        if not lat:
            return Summary(0, 0, None, None, None)
        busy_s = sum(lat) / 1000.0
        return Summary(
            count=len(lat),
            images=sum(imgs),
            p50_ms=percentile(lat, 50),
            p95_ms=percentile(lat, 95),
            images_per_s=sum(imgs) / busy_s if busy_s > 0 else None,
        )
