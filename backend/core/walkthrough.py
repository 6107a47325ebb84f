"""The AWS walk-through's published latency table: the figures this project sets its own beside.

Source: the blog post the project grew from, 在 Amazon SageMaker 上使用 AWS Inferentia2 实现 AI 作画 (AWS China
blog, 2023). Its table: Stable Diffusion 2.1 at 512x512 on an EC2 inf2.xlarge, DPMSolverMultistepScheduler,
P95 inference time in seconds, QPS, and USD per 10,000 images at the us-east-2 on-demand price. The
bf16 30-step QPS is printed as 0.7872 (four decimals where the other rows have three); kept as printed.
"""

from __future__ import annotations

from dataclasses import dataclass

INSTANCE = "inf2.xlarge"
MODEL = "Stable Diffusion 2.1"
SIZE = (512, 512)
# USD per hour behind the cost column: each row's cost is this / 3600 / QPS x 10,000.
PRICE_PER_HOUR = 1.966


@dataclass(frozen=True)
class ReferenceRow:
    """One row of the walk-through's table."""

    precision: str
    steps: int
    p95_s: float
    qps: float
    cost_per_10k: float

    def describe(self) -> str:
        """The row as one line, saying whose figure it is."""
        return (f"AWS walk-through, {INSTANCE}, SD2.1 {SIZE[0]}x{SIZE[1]}, {self.precision}, {self.steps} steps: "
                f"P95 {self.p95_s:.3f} s, {self.qps:g} QPS, ${self.cost_per_10k:.2f} per 10k images")


ROWS: tuple[ReferenceRow, ...] = (
    ReferenceRow("fp32", 20, 1.042, 0.970, 5.63),
    ReferenceRow("fp32", 30, 1.517, 0.676, 8.07),
    ReferenceRow("fp32", 50, 2.365, 0.424, 12.88),
    ReferenceRow("bf16", 20, 0.908, 1.116, 4.89),
    ReferenceRow("bf16", 30, 1.308, 0.7872, 6.94),
    ReferenceRow("bf16", 50, 2.062, 0.497, 10.99),
)


def reference_for(precision: str | None, steps: int | None) -> ReferenceRow | None:
    """The walk-through's row for this precision and step count, or None where it measured none."""
    for row in ROWS:
        if row.precision == precision and row.steps == steps:
            return row
    return None
