"""The walk-through's latency table for any backend: P50, P95, mean, QPS, cost per 10k images.

    python -m benchmarks.latency --model tiny --steps 20,30,50 --runs 10 --instance-type inf2.xlarge
    python -m benchmarks.latency --backend neuron --artifacts sd2_512_root --precisions bf16,fp32
    python -m benchmarks.latency --backend sagemaker --endpoint-name sd21-inf2 --instance-type ml.inf2.xlarge \
        --price-per-hour PRICE     # SageMaker's hourly price for the endpoint's instance (not EC2's)
    python -m benchmarks.latency --model sd21-random --device cuda --precisions bf16 --compare-optimize
    python -m benchmarks.latency --model tiny --mode img2img --strength 0.75 --steps 20,30,50
    python -m benchmarks.latency --model tiny --mode inpaint --image photo.png --mask mask.png
    python -m benchmarks.latency --model tiny --few-step turbo --steps 1,2,4     # a few-step model: no CFG
    python -m benchmarks.latency --model sd21-random --no-cfg --steps 1,2,4      # a CFG model run without CFG
    python -m benchmarks.latency --model tiny --hr-scale 1.5 --hr-upscaler latent --steps 20   # the hires fix

It takes the same backend flags as the app. Each row runs `--warmup` unmeasured requests, then
`--runs` measured ones through `backend.generate`, `--concurrency` at a time; latency is each
request's wall time, QPS is requests / wall time of the measured batch, and cost per 10k images
is the hourly price / 3600 / images per second x 10,000.

`--mode img2img` and `--mode inpaint` start from an input image (`--image`, default a generated
picture: gradients and a disc, at the generation size) and, for inpaint, a mask (`--mask`, default a
generated centred mask: the middle half of each side is repainted). They run int(steps x --strength)
denoising steps, the "steps run" column, plus the VAE encoder on the input.

A few-step model (--few-step, or a model whose scheduler config says so) runs without classifier-free
guidance, one UNet batch a step, and its default steps are 1,2,4; `--no-cfg` runs any model that way
(guidance 0), to measure what the second batch costs. Such rows add a "CFG" column.

`--hr-scale 1.5` (text to image) adds the hires fix to every row: the upscale (`--hr-upscaler`) and a second pass
of `--hr-steps` (0: as many as steps) at the larger size from `--denoising-strength` (A1111's default 0.7). Such
rows add the hires columns: the scale, the upscaler, the second pass's size and its steps. On the neuron backend
the root must hold the larger size (compile.py --sizes 512x512,768x768).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from backend import GenerationRequest, InvalidRequest, Settings, create_backend
from backend.core.api import DEFAULT_HR_STRENGTH, DEFAULT_STRENGTH, HR_UPSCALERS, MODES
from backend.core.settings import add_arguments
from backend.core.stats import cost_per_10k_images, percentile, qps

# On-demand USD per hour, Linux, us-east-1. A snapshot: prices change, and they differ by
# region (the walk-through used us-east-2). Check the pricing pages and pass --price-per-hour.
PRICES_SOURCE = ("AWS EC2 On-Demand pricing (aws.amazon.com/ec2/pricing/on-demand), us-east-1, Linux; "
                 "snapshot taken 2025, not live")
PRICES_PER_HOUR = {
    "inf2.xlarge": 0.7582,
    "inf2.8xlarge": 1.9679,
    "inf2.24xlarge": 6.4906,
    "inf2.48xlarge": 12.9813,
    "g5.xlarge": 1.006,
    "g6.xlarge": 0.8048,
}


@dataclass
class Row:
    """One line of the table."""

    backend: str
    model: str
    device: str
    instance: str
    precision: str
    optimize: str
    steps: int
    runs: int
    concurrency: int
    p50_s: float
    p95_s: float
    mean_s: float
    qps: float
    cost_per_10k: float | None
    mode: str = "txt2img"
    strength: float | None = None  # img2img and inpaint
    steps_run: int | None = None  # the denoising steps that ran: int(steps x strength) from an image
    cfg: bool = True  # classifier-free guidance: two UNet batches a step (guidance_scale > 1)
    hr_scale: float | None = None  # the hires fix (--hr-scale): the scale, upscaler, second size and steps
    hr_upscaler: str | None = None
    hr_size: str | None = None
    hr_steps_run: int | None = None


def price_for(instance: str | None, price_per_hour: float | None) -> float | None:
    """--price-per-hour wins; else the snapshot's EC2 price of --instance-type.

    SageMaker's ml.* instances are billed at SageMaker's own hourly prices, which are higher than
    the EC2 prices of the same hardware: for them the price must be given."""
    if price_per_hour is not None:
        return price_per_hour
    if not instance:
        return None
    if instance.startswith("ml."):
        raise SystemExit(f"--instance-type {instance}: SageMaker bills its instances at its own prices, higher "
                         f"than EC2's and different by region; pass --price-per-hour from the SageMaker pricing "
                         f"page (Real-Time Inference, your region)")
    if instance not in PRICES_PER_HOUR:
        raise SystemExit(f"--instance-type {instance}: no snapshot price; pass --price-per-hour "
                         f"(known: {', '.join(sorted(PRICES_PER_HOUR))})")
    return PRICES_PER_HOUR[instance]


def measure(generate, runs: int, concurrency: int, progress=None) -> tuple[list[float], float]:
    """Run `generate(i)` runs times, concurrency at a time: (latencies in s, wall seconds)."""
    latencies: list[float] = []

    def one(i: int) -> float:
        t0 = time.perf_counter()
        generate(i)
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        return elapsed

    start = time.perf_counter()
    if concurrency <= 1:
        latencies = [one(i) for i in range(runs)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, range(runs)))
    return latencies, time.perf_counter() - start


def summarize(latencies: Sequence[float], wall: float, images_per_request: int,
              price: float | None) -> tuple[float, float, float, float, float | None]:
    """(P50, P95, mean, QPS, cost per 10k images) of one measured batch."""
    rate = qps(len(latencies), wall)
    cost = cost_per_10k_images(price, rate * images_per_request) if price is not None else None
    return (percentile(latencies, 50), percentile(latencies, 95), sum(latencies) / len(latencies), rate, cost)


def markdown(rows: list[Row], price: float | None, instance: str) -> str:
    """The walk-through's table, as Markdown; image modes add the mode, the strength and the steps that ran."""
    images = any(r.mode != "txt2img" for r in rows)
    no_cfg = not all(r.cfg for r in rows)
    hires = any(r.hr_scale for r in rows)
    extra_head, extra_rule = (" mode | strength | steps run |", "---|---:|---:|") if images else ("", "")
    if hires:
        extra_head += " hires | upscaler | hires size | hires steps |"
        extra_rule += "---:|---|---|---:|"
    cfg_head, cfg_rule = (" CFG |", "---|") if no_cfg else ("", "")
    lines = [
        f"| instance | backend | model | precision | optimize | steps |{cfg_head}{extra_head} P50 (s) | P95 (s) "
        f"| mean (s) | QPS | cost / 10k images ($) |",
        f"|---|---|---|---|---|---:|{cfg_rule}{extra_rule}---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cost = f"{r.cost_per_10k:.2f}" if r.cost_per_10k is not None else "-"
        extra = f" {'yes' if r.cfg else 'no'} |" if no_cfg else ""
        if images:
            strength = f"{r.strength:g}" if r.strength is not None else "-"
            extra += f" {r.mode} | {strength} | {r.steps_run if r.steps_run is not None else r.steps} |"
        if hires:
            extra += (f" {r.hr_scale:g} | {r.hr_upscaler} | {r.hr_size} | {r.hr_steps_run} |" if r.hr_scale
                      else " - | - | - | - |")
        lines.append(f"| {r.instance} | {r.backend} | {r.model} | {r.precision} | {r.optimize} | {r.steps} |{extra}"
                     f" {r.p50_s:.3f} | {r.p95_s:.3f} | {r.mean_s:.3f} | {r.qps:.3f} | {cost} |")
    if price is not None:
        lines.append(f"\nCost at ${price:.4f}/h for {instance or 'the given price'}.")
    return "\n".join(lines)


def generated_picture(width: int, height: int):
    """The default input image: horizontal and vertical gradients and a disc (structure to encode, not noise)."""
    from PIL import Image, ImageDraw

    gradient = Image.linear_gradient("L")  # 256x256, dark at the top
    image = Image.merge("RGB", (gradient.transpose(Image.Transpose.ROTATE_90).resize((width, height)),
                                gradient.resize((width, height)), Image.new("L", (width, height), 90)))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 190, 40))
    return image


def centred_mask(width: int, height: int):
    """The default inpaint mask: white (repaint) in the middle half of each side, black around it."""
    from PIL import Image

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def check_mode_flags(args) -> None:
    """Refuse --image and --mask where --mode takes none, before a backend is loaded."""
    if args.image is not None and args.mode == "txt2img":
        raise SystemExit("--image: only for --mode img2img or inpaint")
    if args.mask is not None and args.mode != "inpaint":
        raise SystemExit("--mask: only for --mode inpaint")
    if args.hr_scale != 1.0 and args.mode != "txt2img":
        raise SystemExit("--hr-scale: the hires fix is a second pass of text to image; only for --mode txt2img")


def mode_inputs(args, caps) -> dict:
    """The GenerationRequest fields of --mode: the input image and mask (read or generated) and the strength."""
    if args.mode == "txt2img":
        return {"hr_scale": args.hr_scale, "hr_upscaler": args.hr_upscaler, "hr_steps": args.hr_steps,
                "denoising_strength": args.denoising_strength} if args.hr_scale != 1.0 else {}
    width, height = args.width or caps.default_size[0], args.height or caps.default_size[1]
    inputs = {"mode": args.mode, "strength": args.strength,
              "image": args.image.read_bytes() if args.image else generated_picture(width, height)}
    if args.mode == "inpaint":
        inputs["mask"] = args.mask.read_bytes() if args.mask else centred_mask(width, height)
    return inputs


def hires_fields(request: GenerationRequest) -> dict:
    """A row's hires columns of a validated request (none without the hires fix)."""
    if not request.hires:
        return {}
    width, height = request.output_size
    return {"hr_scale": request.hr_scale, "hr_upscaler": request.hr_upscaler, "hr_size": f"{width}x{height}",
            "hr_steps_run": request.hires_steps_run}


def parse_args(argv: list[str] | None):
    """Flags: the app's backend flags plus the benchmark's own."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    add_arguments(parser, server_flags=False)
    b = parser.add_argument_group("benchmark")
    b.add_argument("--precisions", help="comma-separated (default: every precision the backend offers)")
    b.add_argument("--steps", help="comma-separated step counts (default 20,30,50; 1,2,4 for a few-step model)")
    b.add_argument("--runs", type=int, default=10, help="measured requests per row (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="unmeasured requests per row first (default 2)")
    b.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    b.add_argument("--prompt", default="a lovely cat", help="the prompt (default: the walk-through's)")
    b.add_argument("--guidance-scale", type=float,
                   help="default: the backend's (7.5, or 0 for a few-step model: no CFG)")
    b.add_argument("--no-cfg", action="store_true",
                   help="guidance 0: one UNet batch a step, as a few-step model runs (any model)")
    b.add_argument("--width", type=int, help="default: the backend's default size")
    b.add_argument("--height", type=int)
    b.add_argument("--num-images", type=int, default=1)
    b.add_argument("--mode", choices=MODES, default="txt2img",
                   help="txt2img (default), img2img or inpaint (an input image, and for inpaint a mask)")
    b.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help=f"img2img/inpaint: how much of the input to repaint, 0-1 (default {DEFAULT_STRENGTH}); "
                        f"int(steps x strength) denoising steps run")
    b.add_argument("--image", type=Path, help="img2img/inpaint: the input image (PNG/JPEG; default: a generated "
                                              "picture of gradients and a disc at the generation size)")
    b.add_argument("--mask", type=Path, help="inpaint: the mask, white where to repaint (default: a generated centred "
                                             "mask, the middle half of each side)")
    b.add_argument("--hr-scale", type=float, default=1.0,
                   help="txt2img: the hires fix's upscale, 1-2 (default 1: off); a second pass at the larger size")
    b.add_argument("--hr-upscaler", choices=HR_UPSCALERS, default=HR_UPSCALERS[0],
                   help=f"the hires fix's upscaler (default {HR_UPSCALERS[0]})")
    b.add_argument("--hr-steps", type=int, default=0, help="the hires pass's steps (default 0: as many as steps)")
    b.add_argument("--denoising-strength", type=float, default=DEFAULT_HR_STRENGTH,
                   help=f"the hires pass's denoising strength (default {DEFAULT_HR_STRENGTH})")
    b.add_argument("--instance-type", default="", help=f"for the cost column; EC2 snapshot prices for "
                   f"{', '.join(sorted(PRICES_PER_HOUR))}")
    b.add_argument("--price-per-hour", type=float, help="USD per hour; overrides --instance-type's price")
    b.add_argument("--compare-optimize", action="store_true",
                   help="local backend: also run --optimize none (eager diffusers) beside the chosen "
                        "optimized path (default: cuda-graphs on CUDA, auto elsewhere)")
    b.add_argument("--markdown", help="write the table here")
    b.add_argument("--json", help="write the rows here")
    b.add_argument("--csv", help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the table and print it."""
    args = parse_args(argv)
    from tqdm import tqdm

    settings = Settings.from_namespace(args)
    price = price_for(args.instance_type, args.price_per_hour)
    check_mode_flags(args)
    if args.no_cfg and args.guidance_scale not in (None, 0.0):
        raise SystemExit("error: --no-cfg runs with guidance 0; leave --guidance-scale out.")
    guidance = 0.0 if args.no_cfg else args.guidance_scale
    optimizes = [settings.optimize]
    if args.compare_optimize:
        from backend.inprocess.local import resolve_device  # torch

        fastest = "cuda-graphs" if resolve_device(settings.device) == "cuda" else "auto"
        optimizes = ["none", settings.optimize if settings.optimize not in ("none", "auto") else fastest]

    rows: list[Row] = []
    for optimize in optimizes:
        backend = create_backend(settings.replace(optimize=optimize))
        try:
            caps = backend.capabilities()
            resolved = getattr(backend, "optimize", optimize)  # what auto became on this device
            label = f"{optimize} ({resolved})" if resolved != optimize else optimize
            precisions = args.precisions.split(",") if args.precisions else list(caps.precisions)
            inputs = mode_inputs(args, caps)
            steps_list = [int(s) for s in (args.steps or ("20,30,50" if caps.guidance else "1,2,4")).split(",")
                          if s.strip()]
            total = len(precisions) * len(steps_list) * (args.runs + args.warmup)
            with tqdm(total=total, desc=f"{caps.backend}/{optimize}", unit="req", file=sys.stderr) as bar:
                for precision in precisions:
                    for steps in steps_list:
                        request = GenerationRequest(
                            args.prompt, steps=steps, precision=precision, guidance_scale=guidance,
                            width=args.width, height=args.height, num_images=args.num_images, **inputs)
                        try:
                            # Checked once up front, so a bad flag is one clear line, not a failure per request.
                            validated = request.validated(caps)
                            steps_run = validated.denoising_steps
                        except InvalidRequest as exc:
                            raise SystemExit(f"error: {exc}") from None

                        def generate(i: int, request=request, backend=backend) -> None:
                            backend.generate(dataclasses.replace(request, seed=1000 + i))
                        measure(generate, args.warmup, 1, bar)
                        lat, wall = measure(generate, args.runs, args.concurrency, bar)
                        p50, p95, mean, rate, cost = summarize(lat, wall, args.num_images, price)
                        rows.append(Row(caps.backend, caps.model, caps.device, args.instance_type or "-", precision,
                                        label, steps, args.runs, args.concurrency, p50, p95, mean, rate, cost,
                                        mode=args.mode, strength=inputs.get("strength"), steps_run=steps_run,
                                        cfg=validated.guidance_scale > 1.0, **hires_fields(validated)))
        finally:
            backend.close()

    table = markdown(rows, price, args.instance_type)
    print(table)
    if price is not None and args.price_per_hour is None:
        print(f"Price source: {PRICES_SOURCE}.")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
