"""The web page at / in headless Chromium: upload an image, read the top class, screenshot."""

from __future__ import annotations

import shutil

import httpx
import pytest

from .serving_helpers import Server, images_of, train_tiny

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "web-key"


def _skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; make install does it)"
    if not CHROMIUM or not CHROMEDRIVER:
        return (
            "Debian chromium and chromium-driver are not installed "
            "(make install-browser, or apt-get install chromium chromium-driver)"
        )
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def server(woof_train, cache_dir, tmp_path_factory):
    model = train_tiny(woof_train, cache_dir, tmp_path_factory.mktemp("web") / "model")
    log = tmp_path_factory.mktemp("web-log") / "server.log"
    srv = Server(model, log=log, env={"STACKVISION_API_KEY": KEY})  # not --api-key: ps shows it
    yield srv
    srv.stop()


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_uploads_an_image_and_shows_the_api_top_class(server, browser, woof_val, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = images_of(woof_val)[7]
    with open(image, "rb") as fh:
        api = httpx.post(
            server.url + "/predict",
            files=[("file", ("dog.jpg", fh.read(), "image/jpeg"))],
            headers={"X-API-Key": KEY},
            timeout=120,
        ).json()["predictions"][0]["top"]

    browser.get(f"{server.url}/?api_key={KEY}")  # an old-style link still works, once
    wait = WebDriverWait(browser, 120)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "classes"))
    assert KEY not in browser.current_url  # moved to sessionStorage, out of the address bar
    browser.find_element(By.ID, "file").send_keys(image)
    wait.until(
        lambda d: d.find_element(By.ID, "results").get_attribute("data-state") in ("done", "error")
    )
    assert browser.find_element(By.ID, "error").text == ""
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .label")]
    probs = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prob")]
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    assert labels[0] == api[0]["class"]
    assert labels == [t["class"] for t in api][:5]
    # the heading says how many classes there are to show: 4 for this 4-class model, never "5"
    assert browser.find_element(By.ID, "top-title").text == f"Top {min(5, len(api))} classes"
    assert probs[0] == f"{100 * api[0]['probability']:.1f}%"
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 0


def test_page_without_key_asks_for_one(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")  # the page is open; the API behind it is not
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "keybox").is_displayed())
    assert browser.find_element(By.ID, "model").text == "API key needed"
    browser.find_element(By.ID, "key").send_keys(KEY + Keys.ENTER)
    wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
    assert KEY not in browser.current_url  # sent as the X-API-Key header, never in a URL
    log = server.output()
    assert KEY not in log


def test_report_of_an_86_class_model_in_chromium(cub_dir, browser, tmp_path):
    """report.html of a many-class model at 1280 px: sections in order, 15 confused pairs with
    two loaded thumbnails each, a loaded matrix no wider than the page, nothing overflowing."""
    from selenium.webdriver.common.by import By

    from .report_helpers import SECTIONS

    browser.set_window_size(1280, 1000)
    browser.get((cub_dir / "report" / "report.html").as_uri())
    browser.execute_script("return document.readyState")  # get() waits for the load event
    ids = [s.get_attribute("id") for s in browser.find_elements(By.CSS_SELECTOR, "section")]
    assert ids == [s for s in SECTIONS if s != "curves"] + ["doctor"]  # train adds the doctor
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section > h2")]
    assert headings[:4] == [
        "Summary",
        "Most-confused class pairs",
        "Per class, worst first",
        "Confusion matrix",
    ]
    rows = browser.find_elements(By.CSS_SELECTOR, "#pairs-table tr:has(td)")
    assert len(rows) == 15
    for row in rows:
        widths = browser.execute_script(
            "return Array.from(arguments[0].querySelectorAll('img')).map(i => i.naturalWidth)", row
        )
        assert len(widths) == 2 and all(w > 0 for w in widths), widths

    matrix = browser.execute_script(
        "const i = document.getElementById('confusion-focus'); const r = i.getBoundingClientRect();"
        "return [i.complete, i.naturalWidth, r.width, document.body.clientWidth]"
    )
    complete, natural, shown_w, body_w = matrix
    assert complete and natural > 0
    assert 0 < shown_w <= min(body_w, 1100)  # scaled into the page, never wider than it
    overflow = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert overflow[0] <= overflow[1], overflow  # no horizontal scrolling at 1280 px
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
