"""LocalBackend on the real tiny pipeline: determinism, schedulers, precisions, prompts, models."""

import numpy as np
import pytest
import torch

from backend import (BackendUnavailable, GenerationCancelled, GenerationRequest, SCHEDULERS, Settings,
                     create_backend)
from backend.core.metadata import parse_infotext
from backend.core.schedulers import CFG_SCHEDULERS

FAST = dict(steps=3, width=128, height=128)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_pixels_and_seed_plus_i(tiny_backend):
    a = tiny_backend.generate(GenerationRequest("a lovely cat", seed=10, num_images=2, **FAST))
    b = tiny_backend.generate(GenerationRequest("a lovely cat", seed=10, num_images=2, **FAST))
    assert a.seeds == [10, 11]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images))
    assert not np.array_equal(pixels(a.images[0]), pixels(a.images[1]))
    # Image i of a batch is reproducible alone from its own seed: same noise, so the same image
    # up to float rounding (a batch of 2 runs other CPU kernels than a batch of 1).
    alone = tiny_backend.generate(GenerationRequest("a lovely cat", seed=11, **FAST))
    diff = np.abs(pixels(alone.images[0]) - pixels(a.images[1]))
    assert diff.max() <= 2 and diff.mean() < 0.05
    other = np.abs(pixels(alone.images[0]) - pixels(a.images[0]))
    assert other.mean() > 5


def test_random_seed_is_reported(tiny_backend):
    r = tiny_backend.generate(GenerationRequest("a lovely cat", seed=-1, **FAST))
    again = tiny_backend.generate(GenerationRequest("a lovely cat", seed=r.seeds[0], **FAST))
    assert 0 <= r.seeds[0] < 2**32
    assert np.array_equal(pixels(r.images[0]), pixels(again.images[0]))


def test_matches_a_bare_diffusers_call(tiny_backend):
    """The staged, timed run computes what one plain pipeline call computes."""
    from backend.models.tiny import build_pipeline

    r = tiny_backend.generate(GenerationRequest("a lovely cat", negative_prompt="blurry", seed=3, **FAST))
    pipe = build_pipeline()
    bare = pipe("a lovely cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5,
                height=128, width=128, generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.abs(pixels(r.images[0]) - pixels(bare)).max() <= 1


@pytest.mark.parametrize("scheduler", CFG_SCHEDULERS)  # the few-step ones: test_fewstep.py
def test_each_scheduler_matches_diffusers_without_looking_up_its_first_step(tiny_backend, scheduler, monkeypatch):
    """Each scheduler computes what diffusers computes with it, and none looks up where the loop
    starts: `index_for_timestep` is `(timesteps == t).nonzero().item()`, a wait for the GPU."""
    from backend.core.schedulers import scheduler_class_and_overrides
    from backend.models.tiny import build_pipeline

    cls, overrides = scheduler_class_and_overrides(scheduler)
    pipe = build_pipeline()
    pipe.scheduler = cls.from_config({**pipe.scheduler.config, "steps_offset": 1}, **overrides)
    bare = pipe("a lovely cat", num_inference_steps=3, guidance_scale=7.5, height=128, width=128,
                generator=[torch.Generator().manual_seed(5)]).images[0]

    def no_lookup(*args, **kwargs):
        raise AssertionError("the scheduler looked up its step index from the timestep")

    # Every scheduler but DDIM keeps a step index that it would look up; DDIM steps by timestep
    # arithmetic alone, so it has nothing to look up (and no begin index to set).
    looks_up = hasattr(cls, "index_for_timestep")
    assert looks_up == (scheduler != "ddim")
    if looks_up:
        monkeypatch.setattr(cls, "index_for_timestep", no_lookup)
    ours = tiny_backend.generate(GenerationRequest("a lovely cat", seed=5, scheduler=scheduler, **FAST))
    assert np.abs(pixels(ours.images[0]) - pixels(bare)).max() <= 1
    if looks_up:  # told where the loop started, by the set_timesteps that the pipeline called
        assert tiny_backend._schedulers.get(scheduler).begin_index == 0


def test_stage_timings_add_up(tiny_backend):
    t = tiny_backend.generate(GenerationRequest("a lovely cat", seed=1, **FAST)).timings
    assert len(t.step_ms) == 3 and all(s > 0 for s in t.step_ms)
    assert t.text_encoder_ms > 0 and t.vae_ms > 0 and t.denoise_ms >= sum(t.step_ms)
    assert t.text_encoder_ms + t.denoise_ms + t.vae_ms == pytest.approx(t.total_ms, abs=0.5)


def test_stage_clock_on_a_gpu_reads_its_events_once_at_the_end():
    """The CUDA clock records events and waits only when read (a stand-in for torch.cuda.Event,
    which needs a GPU: each event gets the next time of a fake GPU clock and says when it is waited on)."""
    from backend.inprocess.pipeline import StageClock

    log = []
    gpu_times_ms = iter([100.0, 120.0, 130.5])

    class Event:
        def record(self):
            self.at = next(gpu_times_ms)
            log.append("record")

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, later):
            return later.at - self.at

    clock = StageClock(Event)
    for _ in range(3):
        clock.mark()
    assert log == ["record"] * 3  # marking never waits
    assert clock.intervals_ms() == [20.0, 10.5]
    assert log == ["record"] * 3 + ["wait"]  # one wait, for the last event, when read
    assert StageClock.for_device(torch.device("cpu"))._event is None  # wall time on a CPU


@pytest.mark.parametrize("scheduler", CFG_SCHEDULERS)  # the few-step ones: test_fewstep.py
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_scheduler_and_precision_runs(tiny_backend, scheduler, precision):
    r = tiny_backend.generate(GenerationRequest("a red fox", seed=1, scheduler=scheduler, precision=precision,
                                                **FAST))
    image = r.images[0]
    assert image.size == (128, 128) and image.mode == "RGB"
    arr = pixels(image)
    assert arr.std() > 1  # not a blank or NaN-black image
    info = parse_infotext(image.info["parameters"])
    assert info["params"]["Sampler"] == SCHEDULERS[scheduler]
    assert info["params"]["Precision"] == precision
    assert len(r.timings.step_ms) == 3 and r.timings.total_ms >= r.timings.denoise_ms > 0


def test_schedulers_differ(tiny_backend):
    a = tiny_backend.generate(GenerationRequest("cat", seed=1, scheduler="euler", **FAST)).images[0]
    b = tiny_backend.generate(GenerationRequest("cat", seed=1, scheduler="ddim", **FAST)).images[0]
    assert not np.array_equal(pixels(a), pixels(b))


def test_no_cfg_and_negative_prompt(tiny_backend):
    """Guidance 1.0 turns classifier-free guidance off: the negative prompt is not encoded and has no
    effect, and the UNet runs one sample per image, not CFG's two. Above 1.0 the negative prompt counts."""
    pipe = tiny_backend.precision_pipeline("fp32")
    text_batches, unet_batches = [], []
    hooks = [
        pipe.text_encoder.register_forward_pre_hook(lambda _m, args: text_batches.append(args[0].shape[0])),
        pipe.unet.register_forward_pre_hook(lambda _m, args: unet_batches.append(args[0].shape[0])),
    ]
    try:
        plain = tiny_backend.generate(GenerationRequest("cat", guidance_scale=1.0, seed=2, **FAST))
        assert (text_batches, unet_batches) == ([1], [1, 1, 1])  # the prompt only; 3 steps of one sample
        text_batches.clear(), unet_batches.clear()
        negative = tiny_backend.generate(GenerationRequest("cat", negative_prompt="dog", guidance_scale=1.0, seed=2,
                                                           **FAST))
        assert (text_batches, unet_batches) == ([1], [1, 1, 1])
        text_batches.clear(), unet_batches.clear()
        guided = tiny_backend.generate(GenerationRequest("cat", negative_prompt="dog", guidance_scale=7.5, seed=2,
                                                         **FAST))
        assert (text_batches, unet_batches) == ([1, 1], [2, 2, 2])  # prompt and negative; CFG's pair per step
    finally:
        for hook in hooks:
            hook.remove()
    assert np.array_equal(pixels(plain.images[0]), pixels(negative.images[0]))
    guided_other = tiny_backend.generate(GenerationRequest("cat", negative_prompt="bird", guidance_scale=7.5, seed=2,
                                                           **FAST))
    assert not np.array_equal(pixels(guided.images[0]), pixels(guided_other.images[0]))


def test_long_prompt_is_truncated_with_a_warning(tiny_backend):
    tail = "purple dragon wearing golden crown"
    prompt = "a lovely cat, " * 40 + tail
    r = tiny_backend.generate(GenerationRequest(prompt, seed=1, **FAST))
    assert len(r.warnings) == 1
    assert r.warnings[0].startswith("prompt: longer than the text encoder's 77 tokens")
    assert tail in r.warnings[0]
    short = tiny_backend.generate(GenerationRequest("a lovely cat", seed=1, **FAST))
    assert short.warnings == []


def test_infotext_in_result(tiny_backend):
    r = tiny_backend.generate(GenerationRequest("a lovely cat", negative_prompt="blurry", seed=42, **FAST))
    info = parse_infotext(r.infotexts[0])
    assert info["prompt"] == "a lovely cat" and info["negative_prompt"] == "blurry"
    p = info["params"]
    assert (p["Steps"], p["Seed"], p["Size"], p["CFG scale"], p["Model"], p["Backend"]) == (
        "3", "42", "128x128", "7.5", "tiny", "local")


def test_stop_interrupts_between_steps(tiny_backend):
    seen = []

    def on_step(step, total):
        seen.append(step)
        if step == 2:
            raise GenerationCancelled("stopped")

    with pytest.raises(GenerationCancelled):
        tiny_backend.generate(GenerationRequest("cat", steps=50, width=64, height=64), on_step=on_step)
    assert seen == [1, 2]
    # The backend is free again.
    assert tiny_backend.generate(GenerationRequest("cat", seed=1, **FAST)).images


def test_default_model_offline_falls_back_to_tiny_and_says_so():
    backend = create_backend(Settings(backend="local", device="cpu", offline=True))
    caps = backend.capabilities()
    assert caps.model == "tiny" and caps.is_tiny
    notes = " ".join(caps.notes)
    assert "could not be loaded" in notes and "not Stable Diffusion 2.1" in notes and "--model" in notes


def test_a_named_model_that_cannot_load_is_an_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="--model .*could not be loaded"):
        create_backend(Settings(backend="local", device="cpu", model=str(tmp_path / "missing")))


def test_tiny_folder_is_flagged_and_named_without_its_path(tiny_dir):
    backend = create_backend(Settings(backend="local", device="cpu", model=str(tiny_dir)))
    caps = backend.capabilities()
    assert caps.is_tiny and caps.model == tiny_dir.name
    r = backend.generate(GenerationRequest("cat", seed=1, **FAST))
    assert str(tiny_dir.parent) not in r.infotexts[0]


def test_previews_come_at_the_asked_steps_and_change_no_pixel(tiny_backend, monkeypatch):
    request = GenerationRequest("a lovely cat", seed=4, num_images=2, steps=6, width=128, height=128)
    plain = tiny_backend.generate(request)
    seen = []
    monkeypatch.setattr(tiny_backend, "preview_every", 2)
    with_previews = tiny_backend.generate(request, on_preview=lambda step, total, images: seen.append(
        (step, total, [im.size for im in images])))
    assert tiny_backend.capabilities().previews
    assert seen == [(2, 6, [(16, 16)] * 2), (4, 6, [(16, 16)] * 2)]  # latent size: 128 / 8; none after the last
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(plain.images, with_previews.images))


def test_a_backend_started_without_previews_makes_none(tiny_dir):
    backend = create_backend(Settings(backend="local", model=str(tiny_dir), device="cpu", optimize="none",
                                      preview_every=0))
    try:
        assert backend.capabilities().previews is False
        backend.generate(GenerationRequest("cat", seed=1, **FAST), on_preview=lambda *a: pytest.fail("a preview"))
    finally:
        backend.close()
