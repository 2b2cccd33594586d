"""A real headless browser for the dashboard tests: Debian's chromium driven by Playwright.

Never a downloaded browser build: ``executable_path`` is the system chromium (``.ci/run``
installs it when missing). Screenshots go to ``tests/ui/artifacts/`` (ignored by git). Every
page records console errors and CSP violations; a test fails if its page had any.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("PLUTO_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium found (/usr/bin/chromium): `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright missing: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A browser page on the backend with the key already stored, plus what it logged."""

    def __init__(self, page: Any, backend: Backend) -> None:
        self.page, self.backend = page, backend
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("dialog", self._dialog)
        page.on("request", lambda req: self.requests.append(req.url))

    def _console(self, msg: Any) -> None:
        if "status of 401" in msg.text:  # a refused key is a page state the tests provoke
            return
        if msg.type == "error" or "Content Security Policy" in msg.text:
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, fragment: str) -> Any:
        self.page.goto(f"{self.backend.url}/#{fragment}")
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def chart(self, title: str) -> Any:
        return self.page.locator(f'.chart[data-title="{title}"]')

    def data(self, title: str) -> dict[str, str]:
        return dict(self.chart(title).evaluate("e => ({...e.dataset})"))


def _open_page(browser: Any, backend: Backend, key: str | None) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    if key is not None:
        context.add_init_script(f"localStorage.setItem('pluto_key', {key!r})")
    page = Page(context.new_page(), backend)
    page.page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not page.problems, page.problems


@pytest.fixture
def ui(browser: Any, backend: Backend) -> Iterator[Page]:
    yield from _open_page(browser, backend, backend.key)


@pytest.fixture
def keyless_ui(browser: Any, backend: Backend) -> Iterator[Page]:
    yield from _open_page(browser, backend, None)
