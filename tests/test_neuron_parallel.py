"""--neuron-parallel: the UNet across the cores (unet) or one whole pipeline per core (pipeline), on a CPU-traced tiny
root compiled with --no-cfg.

Stand-ins, and why: no Neuron device here, so the parts are traced with --target cpu; in pipeline mode each simulated
core gets its own instances of every part (on inf2 each is loaded onto its own NeuronCore) and its own torch thread.
Overlap is observed with a barrier in the step callbacks (both requests must be denoising at once to pass it), not by
timing.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from backend import create_backend
from backend.core.api import GenerationRequest
from backend.core.errors import BackendUnavailable, InvalidRequest
from backend.core.metadata import KEY
from backend.neuron.adapters import ShapeGuard, StaticShapeError
from backend.core.settings import Settings

SIZE = 128  # small, for speed
STEPS = 3


@pytest.fixture(scope="module")
def no_cfg_root(tmp_path_factory):
    """The tiny model traced for the CPU in fp32 at SIZE x SIZE, compiled with --no-cfg."""
    from compile_scripts.compile import main

    root = tmp_path_factory.mktemp("no-cfg") / "root"
    assert main(["--model", "tiny", "--out", str(root), "--target", "cpu", "--dtype", "fp32",
                 "--sizes", f"{SIZE}x{SIZE}", "--no-cfg", "--parts", "text_encoder", "unet", "vae_decoder",
                 "vae_post_quant_conv"]) == 0
    return root


def backend_for(root, parallel: str):
    """A NeuronBackend on `root` with --neuron-parallel `parallel`."""
    return create_backend(Settings(backend="neuron", artifacts=str(root), neuron_parallel=parallel, preview_every=0))


@pytest.fixture(scope="module")
def pipeline_backend(no_cfg_root):
    backend = backend_for(no_cfg_root, "pipeline")
    yield backend
    backend.close()


def request(prompt: str, seed: int, **fields) -> GenerationRequest:
    """A no-CFG request at the root's size."""
    return GenerationRequest(prompt=prompt, steps=STEPS, seed=seed, precision="fp32", width=SIZE, height=SIZE,
                             guidance_scale=1.0, **fields)


def run_two(backend, requests, on_first_step=None):
    """Generate two requests from two threads; returns their results and each step's (request index, step, thread)."""
    events: list[tuple[int, int, str]] = []
    results: list = [None, None]
    errors: list = []

    def work(index: int) -> None:
        def on_step(step: int, total: int) -> None:
            events.append((index, step, threading.current_thread().name))
            if step == 1 and on_first_step is not None:
                on_first_step()
        try:
            results[index] = backend.generate(requests[index], on_step=on_step)
        except Exception as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results, events


def test_manifest_records_no_cfg(no_cfg_root):
    manifest = json.loads((no_cfg_root / "compiled_models" / "fp32" / "manifest.json").read_text())
    assert manifest["guidance"] is False
    unet = manifest["sizes"][f"{SIZE}x{SIZE}"]["parts"]["unet"]
    assert unet["inputs"][0]["shape"][0] == 1  # one sample per core, whichever mode serves it


def test_pipeline_mode_runs_two_requests_at_once_each_with_its_own_image(pipeline_backend):
    caps = pipeline_backend.capabilities()
    assert caps.concurrency == 2
    assert "a pipeline on each" in caps.device
    # Both requests must be at their first step together to pass the barrier: serialized, the first would wait
    # for the second forever (the timeout only turns that into a failure instead of a hang).
    barrier = threading.Barrier(2, timeout=120)
    requests = [request("a red cube", 11), request("a blue sphere", 22)]
    results, events = run_two(pipeline_backend, requests, on_first_step=barrier.wait)
    for result, req in zip(results, requests):
        info = result.images[0].info[KEY]
        assert info.startswith(req.prompt)
        assert f"Seed: {req.seed}," in info
        assert result.seeds == [req.seed]
    assert len({name for _, _, name in events}) == 2  # each request on its own lane's torch thread
    assert not np.array_equal(np.asarray(results[0].images[0]), np.asarray(results[1].images[0]))


def test_pipeline_mode_images_match_one_at_a_time(pipeline_backend):
    """Two at once give the same pixels as each alone (lanes share no scheduler or module state)."""
    requests = [request("a red cube", 11), request("a blue sphere", 22)]
    together, _ = run_two(pipeline_backend, requests)
    for req, result in zip(requests, together):
        alone = pipeline_backend.generate(req)
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(result.images[0]))


def test_pipeline_lanes_have_their_own_parts_and_threads(pipeline_backend):
    lanes = pipeline_backend._lanes
    assert len(lanes) == 2
    unets = [lane.pipelines["fp32"].unet.unetwrap.module.runner((SIZE // 8, SIZE // 8)) for lane in lanes]
    assert all(isinstance(u, ShapeGuard) for u in unets)
    assert unets[0].module is not unets[1].module  # a copy per core, as each NeuronCore loads its own
    share = max(1, torch.get_num_threads() // 2)
    assert [lane.device.run(torch.get_num_threads) for lane in lanes] == [share, share]


def test_per_core_unet_refuses_a_cfg_batch(pipeline_backend):
    """Compiled for one sample per core: a batch of 2 (a CFG step's) is refused as the Neuron runtime would."""
    guard = pipeline_backend._lanes[1].pipelines["fp32"].unet.unetwrap.module.runner((SIZE // 8, SIZE // 8))
    latent, timestep, text = (torch.zeros(s.shape, dtype=s.dtype) for s in guard.specs)
    guard(latent, timestep, text)  # the compiled batch runs
    with pytest.raises(StaticShapeError, match="compiled for 1x"):
        guard(torch.cat([latent, latent]), torch.cat([timestep, timestep]), torch.cat([text, text]))


def test_guidance_on_a_no_cfg_root_is_refused(pipeline_backend):
    with pytest.raises(InvalidRequest, match="guidance_scale: 7.5 .*--no-cfg") as info:
        pipeline_backend.generate(GenerationRequest(prompt="a cat", steps=1, seed=1, precision="fp32", width=SIZE,
                                                    height=SIZE, guidance_scale=7.5))
    assert info.value.field == "guidance_scale"


def test_unet_mode_runs_one_request_at_a_time(no_cfg_root):
    backend = backend_for(no_cfg_root, "unet")
    try:
        assert backend.capabilities().concurrency == 1
        requests = [request("a red cube", 11), request("a blue sphere", 22)]
        results, events = run_two(backend, requests)
        order = [index for index, _, _ in events]
        first = order[0]
        assert order == [first] * STEPS + [1 - first] * STEPS  # one request's steps, then the other's
        assert len({name for _, _, name in events}) == 1  # the process's one torch thread
        for result, req in zip(results, requests):
            assert f"Seed: {req.seed}," in result.images[0].info[KEY]
    finally:
        backend.close()


def test_pipeline_mode_on_a_cfg_root_is_refused(no_cfg_root, tmp_path):
    """A root compiled with CFG (here: the manifest as compile.py wrote it before --no-cfg existed) stays on unet."""
    root = tmp_path / "cfg-root"
    shutil.copytree(no_cfg_root, root)
    path = root / "compiled_models" / "fp32" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["guidance"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="--neuron-parallel pipeline: .*classifier-free guidance.*"
                                                 "--neuron-parallel unet.*--no-cfg"):
        backend_for(root, "pipeline")


class StepBarrierBackend:
    """The pipeline backend behind the endpoint's Handler, with a barrier at each request's first step: two requests
    pass it only if the Handler lets both run at once."""

    def __init__(self, backend, barrier: threading.Barrier):
        self.backend = backend
        self.barrier = barrier
        self.name = backend.name

    def capabilities(self):
        return self.backend.capabilities()

    def generate(self, req, on_step=None, on_preview=None):
        return self.backend.generate(req, on_step=lambda step, total: step == 1 and self.barrier.wait())

    def close(self):
        pass


def test_endpoint_handler_runs_two_requests_at_once(pipeline_backend):
    from serving.handler import Handler

    handler = Handler(StepBarrierBackend(pipeline_backend, threading.Barrier(2, timeout=120)))
    answers: list = [None, None]

    def invoke(index: int) -> None:
        body = json.dumps({"prompt": f"prompt {index}", "parameters": {
            "num_inference_steps": STEPS, "guidance_scale": 1.0, "seed": 40 + index, "height": SIZE, "width": SIZE,
            "precision": "fp32"}}).encode()
        answers[index] = handler.handle(body, {"Content-Type": "application/json", "Accept": "application/json"})

    threads = [threading.Thread(target=invoke, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, answer in enumerate(answers):
        assert answer.status == 200, answer.body[:300]
        data = json.loads(answer.body)
        assert data["seeds"] == [40 + index]
        assert data["info"].startswith(f"prompt {index}")


def test_container_runs_a_worker_per_core_in_pipeline_mode():
    from compile_scripts import container

    unet = container.environment()
    assert unet["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1" and "NEURON_RT_NUM_CORES" not in unet
    pipeline = container.environment(neuron_parallel="pipeline")
    assert pipeline["SAGEMAKER_MODEL_SERVER_WORKERS"] == "2"
    assert pipeline["NEURON_RT_NUM_CORES"] == "1"  # each worker process gets one NeuronCore of its own
    assert pipeline["SD_NEURON_PARALLEL"] == "pipeline"


def test_the_deployed_endpoint_reads_neuron_parallel_from_its_environment(no_cfg_root, tmp_path):
    from compile_scripts import container
    from serving.inference import read_config, settings_from_config

    shutil.copytree(no_cfg_root, tmp_path / "root")
    (tmp_path / "endpoint.json").write_text(json.dumps({"artifacts": "root"}))
    config = read_config(tmp_path / "endpoint.json")
    assert settings_from_config(tmp_path, config, container.environment(neuron_parallel="pipeline")).neuron_parallel \
        == "pipeline"
    assert settings_from_config(tmp_path, config, container.environment()).neuron_parallel == "unet"


def test_app_with_pipeline_mode_takes_two_requests_at_once(no_cfg_root, tmp_path):
    from gradio_client import Client
    from test_app import steps_done, wait_for

    from backend.core.metadata import parse_infotext, read_infotext
    from helpers import run_app

    args = ["--backend", "neuron", "--artifacts", str(no_cfg_root), "--neuron-parallel", "pipeline"]
    with run_app(args, tmp_path, timeout=600) as app:  # two lanes load and warm up; the machine may be busy
        clients = [Client(app.url, verbose=False) for _ in range(2)]
        fields = dict(steps=100, width=SIZE, height=SIZE, guidance_scale=1.0, api_name="/generate")
        jobs = [c.submit(prompt=f"user {i}", seed=i, **fields) for i, c in enumerate(clients)]
        # Both denoising at the same time: with one generation at a time the second would still be queued
        # until the first had finished.
        wait_for(lambda: all(steps_done(j) >= 1 and not j.done() for j in jobs), "both requests running at once")
        for i, job in enumerate(jobs):
            gallery, details = job.result(timeout=300)
            assert details["seeds"] == [i]
            info = parse_infotext(read_infotext(gallery[0]["image"]))
            assert info["prompt"] == f"user {i}"
        assert "--neuron-parallel pipeline (2 at once)" in app.log()


def test_switching_cfg_rerecords_the_manifest_without_recompiling(no_cfg_root, tmp_path, capsys):
    """--no-cfg changes what the root is served as, not what is traced: the parts stay up to date."""
    from compile_scripts.compile import main

    root = tmp_path / "root"
    shutil.copytree(no_cfg_root, root)
    unet = next((root / "compiled_models" / "fp32").glob("*/unet.pt"))
    before = unet.stat().st_mtime_ns
    assert main(["--model", "tiny", "--out", str(root), "--target", "cpu", "--dtype", "fp32", "--sizes",
                 f"{SIZE}x{SIZE}", "--parts", "text_encoder", "unet", "vae_decoder", "vae_post_quant_conv"]) == 0
    assert "guidance on from now on" in capsys.readouterr().out
    assert json.loads((root / "compiled_models" / "fp32" / "manifest.json").read_text())["guidance"] is True
    assert unet.stat().st_mtime_ns == before


def test_benchmark_checks_each_image_against_its_request(pipeline_backend):
    from benchmarks.parallel import run

    stats = run(pipeline_backend, concurrency=2, requests=1, steps=1, size=SIZE)
    assert stats["images"] == 2 and stats["images_per_s"] > 0
