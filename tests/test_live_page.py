"""The live page in a real headless Chromium whose fake microphone plays a clip: its words appear as a final; and
what a browser may not do: open the stream from another site's page, or without the service's token."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeDriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from adapters.http import HttpAdapter
from edge_asr.bench.processes import Service, http_get
from edge_asr.config import build_settings

from .fakes import FakeEngine
from .speech import normalise, read_pcm, reference

pytestmark = pytest.mark.system

CLIP = "asterisk_conf-onlyone"
TOKEN = "s3cret-t0ken"
WAIT_S = 20
# A page of another site (another origin: another port) that opens the stream of the service on ?port=.
OTHER_PAGE = """<!doctype html>
<title>another site</title>
<p id="outcome">pending</p>
<script>
const outcome = document.getElementById("outcome");
const port = new URLSearchParams(location.search).get("port");
const socket = new WebSocket(`ws://127.0.0.1:${port}/ws/stream`);
socket.onmessage = (event) => { outcome.textContent = JSON.parse(event.data).type; socket.close(); };
socket.onclose = (event) => { if (outcome.textContent === "pending") outcome.textContent = `closed ${event.code}`; };
</script>
"""


def _microphone_file(tmp_path: Path) -> Path:
    """The clip followed by silence, so the page's stream ends an utterance before the clip loops."""
    path = tmp_path / "microphone.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(bytes(16000) + read_pcm(CLIP) + bytes(3 * 32000))
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium, "the live page test needs Debian's chromium: script/test installs it"
    assert chromedriver, "the live page test needs Debian's chromium-driver: script/test installs it"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={_microphone_file(tmp_path)}",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=ChromeDriverService(executable_path=chromedriver))
    yield driver
    driver.quit()


def _final_texts(driver: webdriver.Chrome) -> list[str]:
    texts = driver.execute_script(
        "return [...document.querySelectorAll('#finals p.final')].map(p => p.firstChild.textContent)"
    )
    return [str(text) for text in texts]


def test_the_page_streams_the_microphone_and_shows_the_final(service: Service, browser: webdriver.Chrome) -> None:
    status, page = http_get(f"{service.base_url}/")
    assert status == 200
    assert isinstance(page, str)
    assert "Start microphone" in page
    browser.get(f"{service.base_url}/")
    browser.find_element(By.ID, "toggle").click()

    expected = normalise(reference(CLIP))
    WebDriverWait(browser, 60).until(lambda driver: expected in [normalise(t) for t in _final_texts(driver)])

    timing = browser.find_element(By.CSS_SELECTOR, "#finals p.final small").text
    assert "asr" in timing
    assert "e2e" in timing
    assert "ttct" in timing


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[str]:
    """The origin of another web site, on a loopback port of its own, serving OTHER_PAGE at /other.html."""
    (tmp_path / "other.html").write_text(OTHER_PAGE, encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start the adapter against a fake engine with `http` settings; its port."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**http: object) -> int:
            adapter = HttpAdapter(FakeEngine(), build_settings({"http": {"host": "127.0.0.1", "port": 0, **http}}))
            await adapter.start()
            stack.push_async_callback(adapter.stop)
            return adapter.port

        yield start


def _settled_text(driver: webdriver.Chrome, element_id: str, passing: tuple[str, ...]) -> str:
    """The element's text once it is none of the `passing` ones."""
    element = driver.find_element(By.ID, element_id)
    WebDriverWait(driver, WAIT_S).until(lambda _driver: element.text not in passing)
    return str(element.text)


def _other_page_outcome(driver: webdriver.Chrome, url: str) -> str:
    driver.get(url)
    return _settled_text(driver, "outcome", ("pending",))


@pytest.mark.parametrize(("allowed", "outcome"), [(False, "closed 1006"), (True, "ready")])
async def test_another_sites_page_may_open_the_stream_only_when_its_origin_is_allowed(
    browser: webdriver.Chrome, other_site: str, serve: Callable[..., Awaitable[int]], allowed: bool, outcome: str
) -> None:
    port = await serve(allowed_origins=[other_site] if allowed else [])

    # Selenium blocks: it runs in a thread while the adapter answers on this event loop.
    seen = await asyncio.to_thread(_other_page_outcome, browser, f"{other_site}/other.html?port={port}")

    assert seen == outcome


def _live_page_status(driver: webdriver.Chrome, url: str) -> str:
    driver.get(url)
    driver.find_element(By.ID, "toggle").click()
    return _settled_text(driver, "status", ("idle", "connecting"))


@pytest.mark.parametrize(
    ("query", "status"), [(f"?token={TOKEN}", "listening"), ("", "refused"), ("?token=wrong", "refused")]
)
async def test_the_live_page_passes_its_token_on_to_the_stream(
    browser: webdriver.Chrome, serve: Callable[..., Awaitable[int]], query: str, status: str
) -> None:
    port = await serve(token=TOKEN)

    seen = await asyncio.to_thread(_live_page_status, browser, f"http://127.0.0.1:{port}/{query}")

    assert seen.startswith(status)
