"""The browser playground at ``/``, driven in a real headless chromium against a real server."""

import base64
import io
import math
import re

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from tests.browser import chromium_driver, wait_for
from tests.conftest import LABELS
from tests.servers import Server

DEADLINE = 240  # seconds; generous: the suite runs on 2 loaded cores


@pytest.fixture(scope="module")
def server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "4", "--api-key", "open-sesame")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def open_playground(browser, url):
    """Load the page and wait until it has read the model (labels offered, Generate enabled)."""
    browser.get(url + "/")
    wait_for(
        lambda: browser.find_element(By.ID, "generate").is_enabled(),
        DEADLINE,
        lambda: f"the page never became ready: {page_state(browser)}",
    )


def page_state(browser) -> str:
    return (
        f"status={browser.find_element(By.ID, 'status').text!r} "
        f"error={browser.find_element(By.ID, 'error').text!r} "
        f"progress={browser.find_element(By.ID, 'progress').text!r}"
    )


def shown(browser, element_id):
    """The element if it is displayed, else None (for ``wait_for``)."""
    element = browser.find_element(By.ID, element_id)
    return element if element.is_displayed() and element.text else None


def fill(browser, **fields):
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def decoded_images(browser, count):
    """The grid's images once ``count`` of them have decoded (naturalWidth > 0)."""

    def ready():
        images = browser.find_elements(By.CSS_SELECTOR, "#grid img")
        widths = [browser.execute_script("return arguments[0].naturalWidth", image) for image in images]
        return images if len(images) == count and all(width > 0 for width in widths) else None

    return wait_for(ready, DEADLINE, lambda: f"{count} decoded images never appeared: {page_state(browser)}")


def pixels_of(image_element) -> np.ndarray:
    source = image_element.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    data = base64.b64decode(source.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


def test_the_page_is_self_contained(server):
    response = httpx.get(server.url + "/", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    # nothing fetched from elsewhere: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html


def test_the_page_offers_the_model_labels(server, browser):
    open_playground(browser, server.url)
    chips = [chip.text for chip in browser.find_elements(By.CSS_SELECTOR, "#labels button")]
    assert chips == LABELS
    assert "tiny-dit" in browser.find_element(By.ID, "model-info").text


def test_generate_shows_decoded_images_with_their_stats(server, browser):
    open_playground(browser, server.url)
    fill(browser, prompt="seven", n=2, steps=4, seed=11)
    browser.find_element(By.ID, "generate").click()
    images = decoded_images(browser, 2)
    assert all(
        image.get_attribute("alt").endswith(f"seed {seed}") for image, seed in zip(images, (11, 12), strict=True)
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "[data-stat=compute]")) == 2
    for stat in browser.find_elements(By.CSS_SELECTOR, "[data-stat=compute]"):
        assert re.fullmatch(r"\d+\.\d+ s", stat.text)
    for key in ("hit-rate", "mac-fraction"):
        for stat in browser.find_elements(By.CSS_SELECTOR, f"[data-stat={key}]"):
            assert re.fullmatch(r"\d+(\.\d)?%", stat.text)
    # live progress came from the job's step events: the bar reached the last step
    progress = browser.find_element(By.CSS_SELECTOR, "#progress .run")
    assert progress.find_element(By.CSS_SELECTOR, ".count").text == "4 / 4"
    assert progress.get_attribute("data-state") == "done"


def test_compare_switch_shows_psnr_computed_from_the_pixels_and_speedup(server, browser):
    open_playground(browser, server.url)
    fill(browser, prompt="three", n=2, steps=8, seed=5, tolerance=0.5)
    browser.find_element(By.CSS_SELECTOR, "label.switch").click()
    assert browser.find_element(By.ID, "compare").is_selected()
    browser.find_element(By.ID, "generate").click()
    rows = wait_for(
        lambda: (
            len(browser.find_elements(By.CSS_SELECTOR, ".comparison")) == 2
            and browser.find_elements(By.CSS_SELECTOR, ".comparison")
        ),
        DEADLINE,
        lambda: f"no comparison appeared: {page_state(browser)}",
    )
    for card, row in zip(browser.find_elements(By.CSS_SELECTOR, "#grid .card"), rows, strict=True):
        cached, uncached = card.find_elements(By.TAG_NAME, "img")
        assert uncached.find_element(By.XPATH, "..").find_element(By.TAG_NAME, "figcaption").text == "uncached"
        # the page's PSNR is the one of the two images' decoded pixels
        mse = np.mean((pixels_of(cached) - pixels_of(uncached)) ** 2)
        expected = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
        shown = float(row.get_attribute("data-psnr"))
        assert shown == expected if math.isinf(expected) else abs(shown - expected) < 1e-6
        assert float(row.get_attribute("data-speedup")) > 0
        assert re.search(r"PSNR (\d+\.\d dB|∞)", row.text) and re.search(r"speedup \d+\.\d\d×", row.text)
    summary = browser.find_element(By.ID, "summary")
    assert summary.find_element(By.CSS_SELECTOR, "[data-metric=speedup] .value").text.endswith("×")
    assert (
        "dB" in summary.find_element(By.CSS_SELECTOR, "[data-metric=psnr] .value").text
        or "∞" in summary.find_element(By.CSS_SELECTOR, "[data-metric=psnr] .value").text
    )


def test_an_unknown_label_shows_the_api_message_on_the_prompt(server, browser):
    open_playground(browser, server.url)
    fill(browser, prompt="banana", steps=4)
    browser.find_element(By.ID, "generate").click()
    error = wait_for(lambda: shown(browser, "error"), DEADLINE, lambda: f"no error shown: {page_state(browser)}")
    assert "422" in error.text and "not one of" in error.text and "field: prompt" in error.text
    assert "invalid" in browser.find_element(By.ID, "prompt").get_attribute("class")
    assert not browser.find_elements(By.CSS_SELECTOR, "#grid img")


def test_an_out_of_range_value_is_reported_on_its_field(server, browser):
    open_playground(browser, server.url)
    fill(browser, prompt="seven", steps=500)
    browser.find_element(By.ID, "generate").click()
    error = wait_for(lambda: shown(browser, "error"), DEADLINE, lambda: f"no error shown: {page_state(browser)}")
    assert "field: steps" in error.text and "200" in error.text
    note = browser.find_element(By.CSS_SELECTOR, "#steps + .field-error")
    assert "200" in note.text
    assert "invalid" in browser.find_element(By.ID, "steps").get_attribute("class")


def test_the_page_asks_for_the_api_key_then_generates_with_it(keyed_server, browser):
    browser.get(keyed_server.url + "/")
    panel = wait_for(lambda: shown(browser, "key-panel"), DEADLINE, lambda: "the key prompt never appeared")
    assert "API key" in panel.text
    fill(browser, **{"api-key": "open-sesame"})
    browser.find_element(By.ID, "key-submit").click()
    wait_for(
        lambda: browser.find_element(By.ID, "generate").is_enabled(),
        DEADLINE,
        lambda: f"the page did not load with the key: {page_state(browser)}",
    )
    assert not browser.find_element(By.ID, "key-panel").is_displayed()
    # generation and its event stream (read with fetch, which can send the key) work with the key
    fill(browser, prompt="one", n=1, steps=3, seed=2)
    browser.find_element(By.ID, "generate").click()
    decoded_images(browser, 1)
    # the key is remembered for the session: a reload does not ask again
    browser.refresh()
    wait_for(
        lambda: browser.find_element(By.ID, "generate").is_enabled(),
        DEADLINE,
        lambda: f"the page did not reload with the remembered key: {page_state(browser)}",
    )
    assert not browser.find_element(By.ID, "key-panel").is_displayed()


def test_a_wrong_api_key_is_refused_with_a_message(keyed_server, browser):
    browser.get(keyed_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(
        lambda: browser.find_element(By.ID, "key-panel").is_displayed(),
        DEADLINE,
        lambda: "the key prompt never appeared",
    )
    fill(browser, **{"api-key": "wrong"})
    browser.find_element(By.ID, "key-submit").click()
    note = wait_for(lambda: shown(browser, "key-error"), DEADLINE, lambda: "no message for a wrong key")
    assert "refused" in note.text
    assert browser.find_element(By.ID, "key-panel").is_displayed()
    assert not browser.find_element(By.ID, "generate").is_enabled()


def test_the_page_ships_as_package_data():
    """An installed wheel must carry the page: pyproject's package data covers it."""
    import fnmatch

    import tomllib

    from service.api.routes_playground import PAGE
    from tests.servers import REPO

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service.api"]
    assert (REPO / "service" / "api" / "static" / PAGE).is_file()
    assert any(fnmatch.fnmatch(f"static/{PAGE}", pattern) for pattern in patterns)
