"""The live page in a real headless Chromium whose fake microphone plays a clip: its words appear as a final."""

from __future__ import annotations

import shutil
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeDriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .server import Service, http_get
from .speech import normalise, read_pcm, reference

CLIP = "asterisk_conf-onlyone"


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
