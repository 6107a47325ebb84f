"""The app's page in Chromium (Playwright), driven as a person does: for the browser benchmarks (benchmarks.live)
and the browser tests, which import these from here.

Chromium is Debian's (`apt-get install -y chromium`; the benchmarks' --chromium, the tests' $SD_CHROMIUM
elsewhere): Playwright never downloads one.
"""

from __future__ import annotations

import re

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def open_app(pg, url: str) -> None:
    """Load the page and wait for the prompt box."""
    pg.goto(url)
    pg.get_by_label("Prompt", exact=True).wait_for(timeout=60_000)


def open_advanced(pg) -> None:
    """Unfold the Advanced accordion."""
    pg.get_by_text("Advanced", exact=True).click()
    pg.get_by_label("number input for Width").wait_for()


def set_slider(pg, label: str, value: float, within=None) -> None:
    """Type a value in a slider's number box (the one inside `within`, a locator such as a tab, where given: each
    generating tab has its own Steps), and check that the slider took it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    scope = within if within is not None else pg
    box = scope.get_by_label(f"number input for {label}")
    slider = scope.get_by_label(f"range slider for {label}")
    for _ in range(3):  # a box typed into while the page is still busy can lose the value: check it took
        box.fill(str(value))
        box.press("Enter")
        try:
            pg.wait_for_function("([el, v]) => el.value === v", arg=[slider.element_handle(), str(value)],
                                 timeout=5_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the {label} slider did not take the value {value}")


def small_settings(pg, steps: int = 2, size: int = 64) -> None:
    """Few steps and a small image (Advanced open)."""
    set_slider(pg, "Steps", steps)
    set_slider(pg, "Width", size)
    set_slider(pg, "Height", size)


def session_count(pg) -> int:
    """Requests the latency panel has counted for this session (0 before the first)."""
    found = re.search(r"This session:\s*(\d+) request", pg.locator("#latency").inner_text())
    return int(found.group(1)) if found else 0


def wait_for_result(pg, before: int, timeout_s: float = 180.0) -> str:
    """Wait until the latency panel counts one more request; returns the panel's text."""
    pg.wait_for_function(
        "n => { const m = (document.querySelector('#latency')?.innerText || '')"
        ".match(/This session:\\s*(\\d+) request/); return m && Number(m[1]) > n; }",
        arg=before, timeout=timeout_s * 1000,
    )
    return pg.locator("#latency").inner_text()
