"""The page as a person sees it, in real headless Chromium against the app under gunicorn.

"Try accessing it from different browsers, you'll see that the counter is not shared between them":
two separate browsers (own profiles, own cookies) click + three times each and each sees its own 3,
while the shared hit count rises for both; with JavaScript (in place) and without (form posts).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.conftest import settings_env

# Two browsers clicking: exact numbers on the page, nothing timed; beside the load tests.
pytestmark = [pytest.mark.slow, pytest.mark.light]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=900,1000",
]


@pytest.fixture
def open_browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: `make test` installs them (Debian packages)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    drivers = []
    # The profiles, and what Chromium and chromedriver leave in TMPDIR, in one folder removed after
    # the test.  A short path: Chromium's singleton socket lives there, and a socket's path may not
    # pass 107 bytes (under tmp_path, Chromium did not start).
    folder = tempfile.mkdtemp(prefix="chromium-")

    def start(javascript: bool = True):
        options = Options()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={os.path.join(folder, f'profile-{len(drivers)}')}")
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        service = Service(CHROMEDRIVER, env={**os.environ, "TMPDIR": folder})
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        drivers.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in drivers:
            driver.quit()
        shutil.rmtree(folder, ignore_errors=True)


def number(driver, element_id: str) -> int:
    """The number an element shows, read in the page in one step: an element handle kept across the
    page's own update (JavaScript) or reload (form post) may no longer name a node of the document."""
    return int(driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id))


def click_plus(driver, times: int) -> None:
    """Click + and wait until the page shows the next number; while the page reloads (form post),
    reading it may fail for a moment, which the wait rides out."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(times):
        expected = number(driver, "mine") + 1
        driver.find_element(By.CSS_SELECTOR, "button[value=inc]").click()
        WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
            lambda d, expected=expected: number(d, "mine") == expected
        )


@pytest.mark.parametrize("session_backend", ["cookie", "server"])
def test_two_browsers_keep_their_own_counters_and_share_the_hits(
    serve, store_settings, open_browser, session_backend, tmp_path
):
    env = {**settings_env(store_settings("filesystem")), "FLASK_SESSION_BACKEND": session_backend}
    server = serve(env, workers=4, threads=4)
    first, second = open_browser(javascript=True), open_browser(javascript=False)
    first.get(server.url + "/")
    hits_seen_first = number(first, "hits")
    second.get(server.url + "/")
    assert number(second, "hits") == hits_seen_first + 1  # one shared hit count
    assert number(first, "mine") == number(second, "mine") == 0

    click_plus(first, 3)  # JavaScript: updated in place through the JSON API, no reload
    assert number(first, "hits") == hits_seen_first
    click_plus(second, 3)  # no JavaScript: each click posts the form and the page reloads
    assert number(second, "mine") == 3
    assert number(second, "hits") == hits_seen_first + 4

    first.refresh()
    assert number(first, "mine") == 3  # kept across a reload
    assert number(first, "hits") == hits_seen_first + 5  # and it saw the other browser's visits
    second.refresh()
    assert number(second, "mine") == 3

    first.save_screenshot(str(tmp_path / f"tally-{session_backend}.png"))
    assert (tmp_path / f"tally-{session_backend}.png").stat().st_size > 10_000
    screenshots = os.environ.get("TALLY_SCREENSHOT_DIR")
    if screenshots:  # how docs/screenshot.png was made
        shutil.copy(tmp_path / f"tally-{session_backend}.png", screenshots)


def test_the_race_section_shows_the_global_variable_repeating_numbers_and_tally_not(
    serve, store_settings, open_browser, tmp_path
):
    """The page's "Will this happen to me?": 100 requests at once from the browser to each counter,
    under gunicorn 4 workers: the global variable hands out numbers twice, Tally none."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    env = {**settings_env(store_settings("filesystem")), "FLASK_RACE_DEMO": "true"}
    server = serve(env, workers=4, threads=4)
    browser = open_browser(javascript=True)
    browser.get(server.url + "/")
    browser.find_element(By.ID, "race-run").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return document.getElementById('race-form').dataset.done") == "1"
    )

    def result(side: str, field: str) -> int:
        script = "return document.querySelector(arguments[0] + ' [data-result]').dataset[arguments[1]]"
        return int(browser.execute_script(script, f"#race-{side}", field))

    assert result("naive", "answers") == result("tally", "answers") == 100
    assert result("naive", "duplicates") > 0  # one global per worker process: numbers handed out again
    assert result("tally", "duplicates") == 0
    bars = browser.find_elements(By.CSS_SELECTOR, "#race-naive rect.twice")
    assert bars, "the naive side's chart shows the repeated numbers"
    assert not browser.find_elements(By.CSS_SELECTOR, "#race-tally rect.twice")
    section = browser.find_element(By.ID, "race")
    browser.execute_script("arguments[0].scrollIntoView()", section)
    section.screenshot(str(tmp_path / "race.png"))
    assert (tmp_path / "race.png").stat().st_size > 5_000
    screenshots = os.environ.get("TALLY_SCREENSHOT_DIR")
    if screenshots:  # how docs/race.png was made
        shutil.copy(tmp_path / "race.png", screenshots)
