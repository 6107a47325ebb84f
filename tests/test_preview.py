"""The latent preview: the projection (shapes, the coefficients' colours, the noise scale) and its pacing."""

import numpy as np
import pytest
import torch

from backend.inprocess.preview import LATENT_RGB_FACTORS, PreviewPacer, latents_to_rgb, preview_images


def test_zero_latents_are_mid_grey_and_each_channel_adds_its_row():
    latents = torch.zeros(5, 4, 2, 3)
    for channel in range(4):
        latents[channel + 1, channel] = 1.0
    pixels = latents_to_rgb(latents)
    assert pixels.shape == (5, 2, 3, 3) and pixels.dtype == np.uint8
    assert (pixels[0] == 128).all()  # (0 + 1) * 127.5, rounded
    for channel, row in enumerate(LATENT_RGB_FACTORS):
        expected = np.round((np.array(row) + 1.0) * 127.5)
        assert (pixels[channel + 1] == expected).all(), channel


def test_out_of_range_clamps_and_noise_scale_divides():
    big = torch.full((1, 4, 1, 1), 20.0)
    assert latents_to_rgb(big).min() in (0, 255)  # saturated, not wrapped around
    scaled = latents_to_rgb(big, noise_scale=20.0)
    assert (scaled == latents_to_rgb(torch.ones(1, 4, 1, 1))).all()


def test_bf16_latents_and_pil_images():
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    images = preview_images(latents)
    assert [im.size for im in images] == [(16, 8), (16, 8)] and images[0].mode == "RGB"
    assert np.asarray(images[1]).std() > 5  # random latents give a varied picture, not a flat one


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 3, 8, 8), (1, 9, 8, 8)])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"expected \(batch, 4, h, w\)"):
        latents_to_rgb(torch.zeros(shape))


# --- when previews are made ------------------------------------------------------------------------


def test_every_n_steps_and_never_after_the_last():
    pacer = PreviewPacer(every=3)
    assert [s for s in range(1, 11) if pacer.due(s, 10, elapsed_ms=1000.0)] == [3, 6, 9]
    assert [s for s in range(1, 7) if PreviewPacer(every=3).due(s, 6, 0.0)] == [3]
    with pytest.raises(ValueError):
        PreviewPacer(every=0)


def test_auto_keeps_previews_within_five_percent_of_the_denoising_time():
    """Steps of 40 ms and previews of 5 ms: previews every third step or so, never over budget."""
    pacer = PreviewPacer()
    made = []
    for step in range(1, 51):
        elapsed = step * 40.0 + pacer.spent_ms
        if pacer.due(step, 50, elapsed):
            pacer.record(5.0)
            made.append(step)
    assert made[0] == 1  # the first is made at once, to learn what one costs
    assert pacer.spent_ms <= 0.05 * (50 * 40.0 + pacer.spent_ms) + 5.0  # at most one preview over, the first
    assert 10 <= len(made) <= 20 and 50 not in made


def test_auto_previews_every_step_when_they_are_cheap_and_rarely_when_dear():
    cheap, dear = PreviewPacer(), PreviewPacer()
    for step in range(1, 21):
        if cheap.due(step, 20, step * 100.0):
            cheap.record(0.5)
        if dear.due(step, 20, step * 100.0):
            dear.record(50.0)
    assert cheap.count == 19 and dear.count == 1


def test_a_caller_that_paces_the_previews_decides_alone():
    """With the caller's wanted() (the app's handler, api.preview_wanted), the backend makes a preview only when it
    says one would be shown: no budget of its own, and --preview-every N keeps to its steps within that."""
    asked = []

    def wanted_at(steps):
        return lambda: asked.append(len(asked) + 1) or asked[-1] in steps

    auto = PreviewPacer(wanted=wanted_at({2, 5}))
    assert [s for s in range(1, 11) if auto.due(s, 10, elapsed_ms=s * 100.0)] == [2, 5]
    asked.clear()
    every = PreviewPacer(every=3, wanted=lambda: True)
    assert [s for s in range(1, 11) if every.due(s, 10, 0.0)] == [3, 6, 9]
    assert [s for s in range(1, 11) if PreviewPacer(every=3, wanted=lambda: False).due(s, 10, 0.0)] == []
    assert not PreviewPacer(wanted=lambda: True).due(10, 10, 0.0)  # never after the last step


def test_preview_wanted_reads_the_callbacks_own_pacing():
    from backend.core.api import preview_wanted

    class Paced:
        def __call__(self, step, total, images):
            pass

        def wanted(self):
            return False

    assert preview_wanted(None) is None and preview_wanted(lambda *a: None) is None
    paced = Paced()
    assert preview_wanted(paced)() is False


def test_the_pipeline_makes_only_the_previews_the_caller_wants(tiny_dir):
    """On the real pipeline: a preview after exactly the steps whose wanted() said yes (asked once per step)."""
    from backend import GenerationRequest, Settings, create_backend
    from backend.inprocess import pipeline

    backend = create_backend(Settings(backend="local", model=str(tiny_dir), device="cpu"))
    request = GenerationRequest("a cat", steps=6, seed=1, width=64, height=64).validated(backend.capabilities())

    class Caller:
        def __init__(self):
            self.asked, self.made = 0, []

        def wanted(self):
            self.asked += 1
            return self.asked in (2, 4)

        def __call__(self, step, total, pictures):
            self.made.append((step, total, pictures[0].size))

    caller = Caller()
    pipeline.run(backend.precision_pipeline("fp32"), request, [1], on_preview=caller)
    assert caller.made == [(2, 6, (8, 8)), (4, 6, (8, 8))] and caller.asked == 5  # not after the last step
    backend.close()


def test_interval_paced_previews_for_where_the_shower_cannot_be_asked():
    """ZeroGPU's worker cannot ask the app's handler: IntervalPaced wants one preview an interval after the start
    and one interval after each (a minute here, so no wait of the test decides it), and hands each on."""
    from backend.inprocess.preview import IntervalPaced

    got = []
    paced = IntervalPaced(lambda step, total, images: got.append(step), interval_s=60.0)
    assert not paced.wanted()
    paced._next = 0.0  # the interval has passed
    assert paced.wanted()
    paced(3, 10, [])
    assert got == [3] and not paced.wanted()
