"""The page in a real browser: Debian's chromium, headless, driven by chromium-driver through
selenium. A forwarder answers real queries from two clients, one of them for a name the fake
injector forges; a person then logs in and reads the page as anyone would.

Set WEB_SCREENSHOTS=DIR to keep screenshots of each page at 1280x800 (to look at them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .fakes import FORGED_LISTED, ask
from .test_web import BLOCKED, Page, censor_forges_blocked

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let selenium fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,800", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-default-apps"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER or "chromedriver"),
                              options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path: Path):
    folder = Path(os.environ.get("WEB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(driver, name: str, full: bool = False) -> None:
        if full:  # the whole page, as tall as it is
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1280, max(800, height))
        driver.save_screenshot(str(folder / f"{name}.png"))
        driver.set_window_size(1280, 800)

    return shoot


def log_in(driver, page: Page, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.base + "/")
    asked = driver.current_url
    assert asked.startswith(page.base + "/login?next=")
    field = driver.find_element(By.ID, "password")
    field.send_keys(password)
    field.submit()
    # the form's answer: the page it leads to, or the login page again (at /login)
    WebDriverWait(driver, 10).until(lambda d: d.current_url != asked)


def test_a_person_reads_the_page(browser, shots, make_proxy, upstream, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    censor_forges_blocked(upstream)
    page = Page(make_proxy, upstream, tmp_path)
    for name in ("www.example.test", "www.example.test", "mail.example.test", BLOCKED):
        ask(page.proxy.port, name, source="127.0.0.51")
    ask(page.proxy.port, "printer.example.test", source="127.0.0.52")
    page.recorded()

    # A wrong password is refused, and says so.
    log_in(browser, page, "not-the-password")
    assert "Wrong password" in browser.find_element(By.CSS_SELECTOR, ".error").text
    shots(browser, "login-refused")
    log_in(browser, page, page.password)
    assert browser.current_url == page.base + "/"

    # The censor panel names the forged name and the address it carried.
    censor = browser.find_element(By.ID, "censor")
    history = page.proxy.service.history
    assert BLOCKED in censor.text and FORGED_LISTED in censor.text, (
        "the history's forgeries:", history.submit(history.forgeries(0)).result(5))
    assert browser.find_element(By.ID, "total-forgeries").text == "2"
    assert browser.find_element(By.ID, "total-queries").text == "5"
    plots = browser.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(plots) == 2 and all(p.size["width"] > 600 for p in plots)
    shots(browser, "overview")
    shots(browser, "overview-full", full=True)

    # The query log shows both clients; a filter narrows it to one.
    browser.find_element(By.LINK_TEXT, "Query log").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "details.row-details")
    assert len(rows) == 5
    assert "127.0.0.52" in browser.find_element(By.CSS_SELECTOR, ".log").text
    form = browser.find_element(By.CSS_SELECTOR, "form.filters")
    form.find_element(By.NAME, "client").send_keys("127.0.0.51")
    Select(form.find_element(By.NAME, "outcome")).select_by_visible_text(
        "answered from the cache")
    form.submit()
    rows = browser.find_elements(By.CSS_SELECTOR, "details.row-details")
    assert len(rows) == 1
    assert "www.example.test" in rows[0].text and "127.0.0.52" not in rows[0].text
    rows[0].find_element(By.TAG_NAME, "summary").click()  # a row opens its details
    details = rows[0].find_element(By.TAG_NAME, "dl").text
    assert "answered from the cache" in details and "Upstream" in details
    shots(browser, "query-log-filtered")

    # The forged name's own log, reached from the censor panel.
    browser.get(page.base + "/")
    browser.find_element(By.ID, "censor").find_element(By.LINK_TEXT, BLOCKED + ".").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "details.row-details")
    assert len(rows) == 1 and BLOCKED in rows[0].text
    shots(browser, "query-log-forged-name")


def test_the_page_in_the_viewers_zone(browser, make_proxy, upstream, tmp_path) -> None:
    """tz.js tells the server the browser's zone; times then read in it."""
    from selenium.webdriver.common.by import By

    page = Page(make_proxy, upstream, tmp_path)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kolkata"})
    log_in(browser, page, page.password)
    browser.get(page.base + "/queries")
    assert "UTC+05:30" in browser.find_element(By.TAG_NAME, "footer").text
