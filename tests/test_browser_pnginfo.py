"""PNG Info in a real browser (Debian's Chromium through Playwright), as a person uses it: drop an image another
tool made, read what the tab says, send it to text to image. With SD_UPDATE_SCREENSHOT=1 the tab after Send is
copied to docs/screenshot-pnginfo.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from helpers import CHROMIUM, screenshot

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SD_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from test_browser import ROOT, open_app  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "png_info"


def with_a_picture(name: str, folder: Path) -> Path:
    """A fixture's text chunks, every one as it is, on a picture worth seeing (the fixtures' pixels are cut to
    one; the tab reads only the chunks)."""
    with Image.open(FIXTURES / name) as source:
        chunks = dict(source.text)
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    picture = Image.new("RGB", (256, 256), (30, 90, 160))
    ImageDraw.Draw(picture).ellipse((50, 50, 206, 206), fill=(240, 200, 40))
    path = folder / name
    picture.save(path, pnginfo=info)
    return path


def drop(pg, path: Path) -> None:
    """Put a file in PNG Info's image box, clearing the one there first."""
    box = pg.locator("#pnginfo-image")
    clear = box.get_by_role("button", name="Clear")
    if clear.count():
        clear.first.click()
    box.locator("input[type=file]").set_input_files(str(path))


def wait_for_text(pg, selector: str, text: str, timeout_s: float = 30.0) -> str:
    """Wait until an element's text (a textarea's value) holds `text`; returns it."""
    pg.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); if (!el) return false;"
        " const t = el.querySelector('textarea') ? el.querySelector('textarea').value : el.innerText;"
        " return t.includes(text); }",
        arg=[selector, text], timeout=timeout_s * 1000)
    area = pg.locator(f"{selector} textarea")
    return area.input_value() if area.count() else pg.locator(selector).inner_text()


def test_drop_an_a1111_and_a_comfyui_png_and_send_one_to_text_to_image(page, tiny_app, tmp_path):
    """The tool, prompt and settings of each on the page; Send fills text to image's controls, and the tab keeps
    what reading found it cannot use beside what Send left as it was."""
    open_app(page, tiny_app.url)
    page.get_by_role("tab", name="PNG Info", exact=True).click()

    drop(page, FIXTURES / "automatic1111_cropped.png")
    text = wait_for_text(page, "#pnginfo-text", "photo of a duck")
    assert "Steps: 15" in text and "Seed: 235284042" in text
    assert "Made by AUTOMATIC1111" in wait_for_text(page, "#pnginfo-note", "Made by")
    fields = page.locator("#pnginfo-fields").inner_text()
    assert "CFG scale" in fields and "235284042" in fields

    # ComfyUI's hires workflow: two samplers; the first pass is read, and the note says so.
    drop(page, with_a_picture("comfyui-hires.png", tmp_path))
    text = wait_for_text(page, "#pnginfo-text", "1girl, solo, hatsune miku")
    assert "Steps: 20" in text and "Seed: 1116526567339338" in text and "Size: 1024x1024" in text
    reading = wait_for_text(page, "#pnginfo-note", "Made by ComfyUI")
    assert "2 sampler nodes" in reading and "Euler a Karras is not one this app has" in reading

    page.get_by_role("button", name="Send to text to image").click()
    tab = page.locator("#tab-txt2img")
    prompt = tab.get_by_label("Prompt", exact=True)
    page.wait_for_function("el => el.value.startsWith('general, masterpiece')", arg=prompt.element_handle(),
                           timeout=30_000)
    assert tab.get_by_label("Negative prompt", exact=True).input_value().startswith("bad quality, worst quality")
    assert tab.get_by_label("number input for Steps").input_value() == "20"
    tab.get_by_text("Advanced", exact=True).click()
    assert float(tab.get_by_label("number input for Guidance scale").input_value()) == 5.0
    assert (tab.get_by_label("number input for Width").input_value(),
            tab.get_by_label("number input for Height").input_value()) == ("1024", "1024")

    page.get_by_role("tab", name="PNG Info", exact=True).click()
    note = wait_for_text(page, "#pnginfo-note", "Sent to text to image")
    assert "2 sampler nodes" in note and "Euler a Karras is not one this app has" in note  # reading's, kept
    assert "Seed: 1116526567339338 is outside" in note  # and Send's own, the sampler not said twice
    assert "not offered here" not in note
    assert page.errors == []
    shot = screenshot(page, tmp_path, "screenshot-pnginfo")
    if os.environ.get("SD_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "screenshot-pnginfo.png")

