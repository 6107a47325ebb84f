"""The hires fix in a real browser (Debian's Chromium through Playwright), as a person uses it: open Advanced,
tick "Hires fix", generate, and the gallery shows the larger image carrying A1111's Hires keys."""

from __future__ import annotations

import os
import re

import pytest

from backend.core.metadata import parse_infotext, read_infotext
from helpers import CHROMIUM

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SD_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from test_browser import (  # noqa: E402
    fetch_png, gallery_sources, open_advanced, open_app, pixels, session_count, set_slider, small_settings,
    wait_for_result,
)


def test_enable_hires_fix_and_the_gallery_shows_the_larger_image(page, tiny_app):
    open_app(page, tiny_app.url)
    page.get_by_label("Prompt", exact=True).fill("a lovely cat")
    open_advanced(page)
    small_settings(page, steps=2, size=64)
    hires = page.locator("#hires input[type=checkbox]")
    assert not hires.is_checked()  # off by default
    hires.check()
    set_slider(page, "Upscale by", 1.5)
    set_slider(page, "Hires steps (0: as Steps)", 2)
    before = session_count(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    panel = wait_for_result(page, before)

    assert "hires upscale (latent, to 96x96)" in panel and "hires denoising (2 steps, strength 0.7" in panel, panel
    assert "no figure for the hires fix" in panel, panel
    sources = gallery_sources(page)
    assert len(sources) == 1
    png = fetch_png(page, sources[0])
    assert pixels(png).shape == (96, 96, 3)
    params = parse_infotext(read_infotext(png))["params"]
    assert (params["Size"], params["Hires upscale"], params["Hires steps"], params["Hires upscaler"],
            params["Denoising strength"]) == ("64x64", "1.5", "2", "Latent", "0.7")
    assert not page.errors, page.errors
    assert re.search(r"This request: \d+ ms for 1 image", panel), panel
