"""Image to image and Inpaint in a real browser (Debian's Chromium through Playwright), as a person uses them:
upload a picture, paint a mask stroke with the mouse, generate. With SD_UPDATE_SCREENSHOT=1 the pages after the
generations are copied to docs/screenshot-img2img.png and docs/screenshot-inpaint.png."""

from __future__ import annotations

import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.core.metadata import parse_infotext, read_infotext
from helpers import CHROMIUM, screenshot

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SD_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from test_browser import ROOT, fetch_png, open_app, set_slider  # noqa: E402

SIZE = 256


@pytest.fixture(scope="module")
def picture_path(tmp_path_factory):
    """A picture worth looking at in a screenshot: a yellow disc on blue."""
    path = tmp_path_factory.mktemp("pictures") / "disc.png"
    image = Image.new("RGB", (SIZE, SIZE), (30, 90, 160))
    ImageDraw.Draw(image).ellipse((50, 50, 206, 206), fill=(240, 200, 40))
    image.save(path)
    return path


def open_tab(pg, mode: str, label: str):
    """Click a mode's tab; its container, once its prompt box shows."""
    pg.get_by_role("tab", name=label, exact=True).click()
    tab = pg.locator(f"#tab-{mode}")
    tab.get_by_label("Prompt", exact=True).wait_for(timeout=30_000)
    return tab


def small_settings(pg, tab, steps: int) -> None:
    set_slider(pg, "Steps", steps, within=tab)
    tab.get_by_text("Advanced", exact=True).click()
    set_slider(pg, "Width", SIZE, within=tab)
    set_slider(pg, "Height", SIZE, within=tab)


def session_count(pg, panel: str) -> int:
    found = re.search(r"This session:\s*(\d+) request", pg.locator(panel).inner_text())
    return int(found.group(1)) if found else 0


def wait_for_result(pg, panel: str, before: int) -> str:
    """Wait until this tab's latency panel counts one more request; its text."""
    pg.wait_for_function(
        "([sel, n]) => { const m = (document.querySelector(sel)?.innerText || '')"
        ".match(/This session:\\s*(\\d+) request/); return m && Number(m[1]) > n; }",
        arg=[panel, before], timeout=180_000)
    return pg.locator(panel).inner_text()


def result_png(pg, tab) -> bytes:
    [src] = tab.locator("button.thumbnail-item.thumbnail-lg img").evaluate_all("els => els.map(e => e.src)")
    return fetch_png(pg, src)


def keep_screenshot(pg, tmp_path, name: str) -> None:
    shot = screenshot(pg, tmp_path, name)
    if os.environ.get("SD_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / f"{name}.png")


def test_img2img_upload_a_picture_and_generate(page, tiny_app, picture_path, tmp_path):
    """Upload a picture, see how many steps Strength runs, generate; the panel shows the encode and those steps."""
    open_app(page, tiny_app.url)
    tab = open_tab(page, "img2img", "Image to image")
    tab.locator("#img2img-image input[type=file]").set_input_files(str(picture_path))
    tab.locator("#img2img-image img").first.wait_for(timeout=30_000)
    small_settings(page, tab, steps=12)
    set_slider(page, "Strength", 0.5, within=tab)
    page.wait_for_function("() => document.querySelector('#steps-run-img2img').innerText.includes('Runs 6 of 12')")
    tab.get_by_label("Prompt", exact=True).fill("a lovely cat")
    before = session_count(page, "#latency-img2img")
    tab.get_by_role("button", name="Generate").click()
    panel = wait_for_result(page, "#latency-img2img", before)
    assert "VAE encode" in panel and "denoising (6 of 12 steps, strength 0.5" in panel, panel
    params = parse_infotext(read_infotext(result_png(page, tab)))["params"]
    assert (params["Mode"], params["Denoising strength"], params["Steps"], params["Size"]) == (
        "img2img", "0.5", "12", f"{SIZE}x{SIZE}")
    assert page.errors == []
    keep_screenshot(page, tmp_path, "screenshot-img2img")


def test_inpaint_paint_a_stroke_and_generate(page, tiny_app, picture_path, tmp_path):
    """Upload a picture into the editor, paint a stroke across it with the mouse, generate: only the stroke's
    neighbourhood changes, every pixel far from it is the picture's."""
    open_app(page, tiny_app.url)
    tab = open_tab(page, "inpaint", "Inpaint")
    editor = tab.locator("#inpaint-editor")
    with page.expect_file_chooser() as chooser:
        editor.get_by_role("button", name="Upload").first.click()
    chooser.value.set_files(str(picture_path))
    editor.get_by_role("button", name="Brush Size").wait_for(timeout=30_000)  # the drawing tools: a picture is in
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy - 20)
    page.mouse.down()
    for i in range(1, 13):
        page.mouse.move(cx - 60 + i * 10, cy - 20 + i * 3)
    page.mouse.up()
    editor.get_by_role("button", name="Undo").wait_for(state="visible")
    small_settings(page, tab, steps=10)
    tab.get_by_label("Prompt", exact=True).fill("a red fox")
    before = session_count(page, "#latency-inpaint")
    tab.get_by_role("button", name="Generate").click()
    panel = wait_for_result(page, "#latency-inpaint", before)
    assert "VAE encode" in panel and "denoising (7 of 10 steps, strength 0.75" in panel, panel
    png = result_png(page, tab)
    params = parse_infotext(read_infotext(png))["params"]
    assert (params["Mode"], params["Mask blur"], params["Size"]) == ("inpaint", "4", f"{SIZE}x{SIZE}")
    with Image.open(picture_path) as source, Image.open(io.BytesIO(png)) as result:
        changed = np.any(np.asarray(result.convert("RGB")) != np.asarray(source.convert("RGB")), axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any(), "the stroke repainted nothing"
    # The stroke ran across the middle: what changed is a band there, the corners are the picture's own.
    assert changed.mean() < 0.5 and not changed[:40, :40].any() and not changed[-40:, -40:].any()
    assert 60 < xs.mean() < 200 and 60 < ys.mean() < 200, (xs.mean(), ys.mean())
    assert page.errors == []
    keep_screenshot(page, tmp_path, "screenshot-inpaint")
