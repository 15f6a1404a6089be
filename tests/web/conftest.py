"""Browser fixtures: Debian's Chromium (/usr/bin/chromium, installed by `scripts/setup.sh --test`) driven headless
by Playwright from PyPI, never a downloaded browser; a fake microphone that reads a WAV made with the built-in
voice; a real `shoal serve`. On failure a test leaves a screenshot and the page's console under artifacts/web/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.realtime.conftest import Server, start_server

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "web"

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]

# What the fake microphone says, over and over (Chromium loops the file): about 14 s of speech.
MIC_TEXT = (
    "The north wind and the sun were disputing which was the stronger, when a traveler came along wrapped in a "
    "warm cloak. They agreed that the one who first succeeded in making the traveler take his cloak off should be "
    "considered stronger than the other."
)

TIMEOUT_MS = 60_000  # generous: a 2-core machine runs the server, its espeak workers and Chromium at once


def chromium_executable() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("web-data"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def fake_mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WAV of real speech for Chromium's fake microphone, spoken by the built-in voice."""
    out = tmp_path_factory.mktemp("mic") / "mic.wav"
    subprocess.run(
        [sys.executable, "-m", "realtime", "say", MIC_TEXT, "--speaker", "3", "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module")
def browser(fake_mic_wav: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium at /usr/bin/chromium (scripts/setup.sh --test installs it with apt)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={fake_mic_wav}"],
        )
        yield browser
        browser.close()


class ShoalPage:
    """One browser tab on the voice chat page, with the `window.shoal` handle at hand."""

    def __init__(self, page: Any, server: Server) -> None:
        self.page = page
        self.server = server
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))
        page.set_default_timeout(TIMEOUT_MS)

    def open(self, query: str = "", server: Server | None = None) -> None:
        self.page.goto(f"{(server or self.server).http}/{query}")
        self.wait_connected()

    def wait_connected(self) -> None:
        self.wait_for("window.shoal !== undefined && shoal.stats().connected")

    def stats(self) -> dict[str, Any]:
        return self.page.evaluate("shoal.stats()")  # type: ignore[no-any-return]

    def say(self, text: str, speaker: int = 0) -> dict[str, Any]:
        """One whole turn through `window.shoal.say`; returns its turn.done."""
        return self.page.evaluate("([t, s]) => shoal.say(t, s)", [text, speaker])  # type: ignore[no-any-return]

    def wait_for(self, expression: str, timeout_ms: int = TIMEOUT_MS) -> None:
        self.page.wait_for_function(expression, timeout=timeout_ms, polling=50)

    def wait_played_out(self) -> None:
        self.wait_for("shoal.stats().playback === 'idle' && shoal.stats().bufferMs === 0")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions (a favicon or source map 404 would count too)."""
        return [line for line in self.console if line.startswith(("error:", "pageerror:"))]


# The widths every screenshot test is taken at: a desktop window and a phone (at 2x, as phones render).
VIEWPORTS = pytest.mark.parametrize(
    ("name", "viewport"), [("desktop", {"width": 1280, "height": 860}), ("phone", {"width": 390, "height": 844})]
)


@contextmanager
def sized_page(browser: Any, server: Server, name: str, viewport: dict[str, int]) -> Iterator[ShoalPage]:
    """A tab of its own at a screenshot test's viewport (closed afterwards)."""
    context = browser.new_context(viewport=viewport, device_scale_factor=2 if name == "phone" else 1)
    try:
        yield ShoalPage(context.new_page(), server)
    finally:
        context.close()


def screenshot(page: ShoalPage, filename: str) -> Path:
    """Save the whole page under artifacts/web/ and check that it does not scroll sideways at this width."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / filename
    page.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    width = page.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways at {width[1]} px: {width}"
    return path


def _artifact_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1])[:120]


@pytest.fixture
def shoal_page(browser: Any, web_server: Server, request: pytest.FixtureRequest) -> Iterator[ShoalPage]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ShoalPage(context.new_page(), web_server)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = _artifact_name(request.node.nodeid)
        try:
            page.page.screenshot(path=str(ARTIFACTS / f"failed-{name}.png"), full_page=True)
            log = page.page.evaluate("document.getElementById('log')?.innerText ?? ''")
        except Exception as exc:  # the page may be gone; the console is still worth keeping
            log = f"(page unavailable: {exc})"
        (ARTIFACTS / f"failed-{name}.log").write_text("\n".join([*page.console, "--- page log ---", log]) + "\n")
    context.close()
