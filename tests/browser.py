"""Open a report in a real headless Chromium (Debian's), collect console errors, screenshot it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError(
            "Chromium is required for the report tests: apt-get install chromium (.ci/run does)."
        )
    return path


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: int = 0
    slider_changed: bool | None = None
    screenshot: Path | None = None
    # What a reader needs beside each picture: counts of decoded images by class, the visible
    # text of colour-bar labels and ticks, of decision captions (score, predicted, target).
    decoded: dict[str, int] = field(default_factory=dict)
    colour_bar_labels: list[str] = field(default_factory=list)
    colour_bar_ticks: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    # The visible text of each verdict section, in page order, and whether the first one is
    # above the first map (a reader sees what to trust before the pictures).
    verdicts: list[str] = field(default_factory=list)
    verdict_first: bool | None = None


def check_report(html_file: Path, screenshot: Path) -> PageCheck:
    """Load the file, verify images decode, move the first slider if any, take a screenshot."""
    from playwright.sync_api import sync_playwright

    result = PageCheck()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: m.type == "error" and result.console_errors.append(m.text))
            page.on("pageerror", lambda e: result.console_errors.append(str(e)))
            page.goto(html_file.resolve().as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth])"
            )
            result.images = len(sizes)
            result.broken_images = sum(1 for done, width in sizes if not done or width == 0)
            result.decoded = page.evaluate(
                """() => Object.fromEntries(['overlay', 'cbar-img', 'curve'].map(c => [c,
                    [...document.querySelectorAll('img.' + c)]
                        .filter(e => e.complete && e.naturalWidth > 0).length]))"""
            )
            visible = "els => els.filter(e => e.offsetWidth > 0).map(e => e.innerText.trim())"
            result.colour_bar_labels = page.eval_on_selector_all(".cbar-label", visible)
            result.colour_bar_ticks = page.eval_on_selector_all(".cbar-ticks", visible)
            result.facts = page.eval_on_selector_all("p.facts", visible)
            result.verdicts = page.eval_on_selector_all("section.verdict", visible)
            result.verdict_first = page.evaluate(
                """() => {
                    const v = document.querySelector('section.verdict');
                    const m = document.querySelector('img.overlay');
                    if (!v || !m) return null;
                    return v.getBoundingClientRect().top < m.getBoundingClientRect().top;
                }"""
            )
            if page.query_selector("input.slider"):
                group = page.get_attribute("input.slider", "data-group")
                selector = f'img[data-group="{group}"]'
                before = page.get_attribute(selector, "src")
                page.eval_on_selector(
                    "input.slider",
                    "s => { s.value = 0; s.dispatchEvent(new Event('input')); }",
                )
                result.slider_changed = page.get_attribute(selector, "src") != before
            page.screenshot(path=str(screenshot), full_page=True)
            result.screenshot = screenshot
        finally:
            browser.close()
    return result
