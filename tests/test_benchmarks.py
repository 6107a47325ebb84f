"""The benchmark arithmetic, checked against the walk-through's own rows, and the scripts' plumbing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.core.stats import LatencyStats, cost_per_10k_images, percentile, qps
from benchmarks import latency
from helpers import CHROMIUM, ROOT

# Each row of the walk-through's table against its cost column: tests/test_walkthrough.py.


def test_walkthrough_headline_row():
    assert round(cost_per_10k_images(1.966, 1.116), 2) == 4.89


def test_percentiles_are_numpys_linear_ones():
    values = [2275.7, 2250.3, 2216.6, 2100.0, 2300.0, 2199.0, 2210.0, 2230.0, 2260.0, 2190.0]
    assert percentile(values, 95) == pytest.approx(np.percentile(values, 95))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_qps_and_errors():
    assert qps(10, 8.96) == pytest.approx(1.116, abs=1e-3)
    with pytest.raises(ValueError):
        qps(1, 0)
    with pytest.raises(ValueError):
        cost_per_10k_images(1.0, 0)


def test_latency_stats_window_and_rate():
    stats = LatencyStats(window=3)
    assert stats.summary().count == 0
    for ms, n in [(1000, 1), (500, 2), (1500, 1), (1000, 2)]:
        stats.add(ms, n)
    s = stats.summary()
    assert s.count == 3 and s.images == 5
    assert s.p50_ms == 1000 and s.images_per_s == pytest.approx(5 / 3.0)


def test_summarize_and_prices():
    p50, p95, mean, rate, cost = latency.summarize([1.0, 1.0, 2.0, 2.0], wall=6.0, images_per_request=2,
                                                    price=3.6)
    assert (p50, mean) == (1.5, 1.5) and p95 == pytest.approx(2.0)
    assert rate == pytest.approx(4 / 6) and cost == pytest.approx(3.6 / 3600 / (8 / 6) * 10000)
    assert latency.price_for("inf2.xlarge", None) == latency.PRICES_PER_HOUR["inf2.xlarge"]
    assert latency.price_for("anything", 2.0) == 2.0
    assert latency.price_for("ml.inf2.xlarge", 0.99) == 0.99
    with pytest.raises(SystemExit, match="SageMaker bills its instances at its own prices"):
        latency.price_for("ml.inf2.xlarge", None)  # not EC2's price of the same hardware
    with pytest.raises(SystemExit, match="--price-per-hour"):
        latency.price_for("x9.huge", None)


def test_measure_runs_concurrently():
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    lat, wall = latency.measure(work, runs=8, concurrency=4)
    assert len(lat) == 8 and peak[0] == 4 and wall < sum(lat)


def test_latency_script_on_the_tiny_model(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.latency", "--model", "tiny", "--device", "cpu", "--steps", "2",
         "--runs", "2", "--warmup", "1", "--width", "64", "--height", "64", "--instance-type", "inf2.xlarge",
         "--json", str(out), "--csv", str(tmp_path / "rows.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| instance | backend | model | precision |" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["steps"] == 2 and r["p95_s"] >= r["p50_s"] > 0 and r["cost_per_10k"] > 0 for r in rows)
    assert (tmp_path / "rows.csv").read_text().startswith("backend,model,device,instance")


def test_latency_script_runs_image_to_image_and_inpaint(tmp_path):
    """--mode img2img with an input file, --mode inpaint with the generated picture and centred mask: the rows
    say the mode, the strength and the denoising steps that ran (int(steps x strength))."""
    from PIL import Image

    Image.new("RGB", (96, 64), "teal").save(tmp_path / "input.png")
    rows = {}
    for mode, extra in (("img2img", ["--image", str(tmp_path / "input.png")]), ("inpaint", [])):
        out = tmp_path / f"{mode}.json"
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.latency", "--model", "tiny", "--device", "cpu", "--steps", "4",
             "--precisions", "fp32", "--runs", "2", "--warmup", "1", "--width", "64", "--height", "64",
             "--mode", mode, "--strength", "0.5", "--instance-type", "inf2.xlarge", "--json", str(out), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "| steps | mode | strength | steps run | P50 (s) |" in done.stdout
        assert f"| 4 | {mode} | 0.5 | 2 |" in done.stdout
        rows[mode], = json.loads(out.read_text())
    for mode, row in rows.items():
        assert (row["mode"], row["strength"], row["steps"], row["steps_run"]) == (mode, 0.5, 4, 2)
        assert row["p95_s"] >= row["p50_s"] > 0 and row["cost_per_10k"] > 0


def test_latency_script_refuses_bad_mode_flags_in_one_line():
    for flags, expected in ((["--mask", "m.png"], "--mask: only for --mode inpaint"),
                            (["--mode", "img2img", "--strength", "0.01"],
                             "error: strength: 0.01 with 4 steps runs no denoising step")):
        done = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--model", "tiny", "--device", "cpu",
                               "--steps", "4", "--precisions", "fp32", "--width", "64", "--height", "64", *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and expected in done.stderr, done.stderr[-1000:]
        assert "Traceback" not in done.stderr


def test_overhead_script_runs_every_app_path(tmp_path):
    """benchmarks.overhead at a small size: bare and backend workers beside the app through Gradio's HTTP API.

    (The gradio_client path is the same client.predict call that the app tests make; one app start is enough.)"""
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--paths", "a,b,c1", "--runs", "2", "--warmup", "0",
         "--steps", "2", "--size", "64", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| path | median ms | min ms | ratio to (a) | added to (b), ms |" in done.stdout
    rows = {r["path"][:4]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"(a) ", "(b) ", "(c1)"}
    assert rows["(a) "]["ratio"] == 1.0 and rows["(a) "]["over_b_ms"] is None
    row = rows["(c1)"]
    assert len(row["raw_ms"]) == 2 and row["over_b_ms"] is not None and row["ratio"] > 0
    assert "backend" in row["where"] and "PNG files" in row["where"]


def test_floor_script_runs_the_app_beside_a_bare_gradio_app(tmp_path):
    """benchmarks.floor: the app's own Blocks around its instant stand-in backend, beside a bare gr.Blocks, both
    through Gradio's HTTP API (new and kept sessions), with the profile's stages; the app answers with its PNG."""
    browser = Path(CHROMIUM).exists()  # and the Chromium path, clicking each page, where there is one
    out = tmp_path / "floor.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", "--runs", "2", "--warmup", "0", "--pause", "0", "--profile",
         "--json", str(out), *(["--browser", "--chromium", CHROMIUM] if browser else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| server | Gradio session | n | median ms |" in done.stdout
    rows = json.loads(out.read_text())
    if browser:
        for name in ("app, Chromium", "bare, Chromium"):
            clicks = rows.pop(name)
            assert clicks["n"] == 2 and all(ms > 0 for ms in clicks["raw_ms"]), name
        assert "| Chromium: click -> the new picture loaded in the gallery |" in done.stdout
    assert set(rows) == {"app, new session", "bare, new session", "app, kept session", "bare, kept session"}
    for name, row in rows.items():
        assert row["n"] == 2 and len(row["raw_ms"]) == 2 and row["total_ms"] > 0, name
        assert row["stages"]["process_api calls"] == (2 if name.startswith("app") else 1), name
    app = rows["app, kept session"]
    assert app["app_ms"] > 0 and app["stages"]["backend.generate"] > 0
    assert app["stages"]["OutputStore.save (PNG file)"] > 0
    assert "gradio SessionState() (a new session's state)" in rows["app, new session"]["stages"]


def test_preview_script_alternates_preview_on_and_off_in_one_app(tmp_path):
    """benchmarks.preview: one app, on and off alternating; the previews it counts are the captioned pictures the
    app streamed (and fetched, as the page does), none with the preview off. 40 steps at 512x512 outlast the
    first preview's pacing (0.5 s) on a fast machine; a slower one only shows more."""
    out, table = tmp_path / "preview.json", tmp_path / "preview.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.preview", "--runs", "2", "--warmup", "0", "--steps", "40",
         "--json", str(out), "--markdown", str(table)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sides = json.loads(out.read_text())
    assert len(sides["on"]) == len(sides["off"]) == 2
    assert all(row["shown_at_s"] for row in sides["on"]) and not any(row["shown_at_s"] for row in sides["off"])
    for row in sides["on"] + sides["off"]:
        assert 0 < row["denoise_ms"] <= row["backend_ms"] <= row["e2e_ms"]
    text = table.read_text()
    assert "| denoising (ms) |" in text and "Previews shown per generation: median" in text


def test_live_script_measures_a_pause_in_chromium(tmp_path):
    """benchmarks.live, one round: the page typed into, the generation found in the app's log, the picture's arrival
    stamped in the page; the parts are in the order they happen."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    out = tmp_path / "live.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.live", "--rounds", "1", "--chromium", CHROMIUM,
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = json.loads(out.read_text())
    assert row["prompt"] == "a red fox number 1"
    assert 0 < row["start_ms"] < row["image_ms"] and 0 < row["backend_ms"] <= row["handler_ms"]
    assert "| start over the pause" in done.stdout


def test_instant_backend_answers_like_a_backend():
    """The benchmark's stand-in validates as every backend does and labels its images with the real infotext."""
    from backend import GenerationRequest, InvalidRequest
    from backend.core.metadata import parse_infotext
    from benchmarks.floor import InstantBackend

    backend = InstantBackend()
    steps_seen = []
    result = backend.generate(GenerationRequest("a cat", steps=3, seed=7, width=64, height=128, num_images=2),
                              on_step=lambda step, total: steps_seen.append((step, total)))
    assert [img.size for img in result.images] == [(64, 128)] * 2 and result.seeds == [7, 8]
    assert steps_seen == [(1, 3), (2, 3), (3, 3)] and len(result.timings.step_ms) == 3
    assert parse_infotext(result.infotexts[1])["params"]["Seed"] == "8"
    with pytest.raises(InvalidRequest):
        backend.generate(GenerationRequest("", steps=1))


def test_optimized_path_matches_eager_on_cpu():
    """--optimize sdpa (fused QKV, channels_last) runs here at a small size and changes no pixels."""
    from backend import GenerationRequest, Settings, create_backend

    request = GenerationRequest("cat", seed=3, steps=3, width=64, height=64)
    eager = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none")).generate(request)
    fast = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="sdpa")).generate(request)
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (eager, fast))
    assert np.abs(a - b).max() <= 2


def test_compile_path_captures_whole_graphs_at_a_small_size(monkeypatch):
    """--optimize compile / cuda-graphs, on the CPU: torch.compile(fullgraph=True) captures the UNet and the
    VAE decoder whole (a graph break would fail the warm-up on a GPU), and the images are sdpa's.

    Only inductor's code generation is left out (minutes on 2 cores): the captured graphs run as they are."""
    import torch

    from backend import GenerationRequest, Settings, create_backend

    real_compile = torch.compile
    captured = []

    def capture_only(model, *, mode=None, fullgraph=False, **kwargs):
        assert fullgraph and mode == "default"  # on a CPU; reduce-overhead (CUDA graphs) is for CUDA

        def backend(graph_module, example_inputs):
            captured.append(graph_module)
            return graph_module.forward
        return real_compile(model, backend=backend, fullgraph=True, **kwargs)

    monkeypatch.setattr(torch, "compile", capture_only)
    torch._dynamo.reset()
    try:
        # cuda-graphs (what --compare-optimize runs on CUDA) is compile's path with another inductor mode.
        compiled = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="cuda-graphs"))
        assert len(captured) == 2  # the warm-up captured the UNet and the VAE decoder, each in one graph
        request = GenerationRequest("cat", seed=3, steps=3, width=64, height=64)
        fast = compiled.generate(request)
        eager = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="sdpa")).generate(request)
    finally:
        torch._dynamo.reset()
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (eager, fast))
    assert np.abs(a - b).max() <= 1


def test_sd21_random_has_the_real_architecture():
    import torch

    from backend.models import sd21_random

    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**sd21_random.unet_config())
    params = sum(p.numel() for p in unet.parameters())
    assert 865e6 < params < 866e6  # SD2.1's UNet: 865.9M parameters
