"""Browser test of the built book: serve _build/html on 127.0.0.1, load the
index and chapter 00 in headless Chromium, and check the title, that every
<img> loaded (naturalWidth > 0) and that no request returned 404.

Run after the book is built (``make test`` builds it first)."""
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

HTML = Path(__file__).resolve().parent.parent / "_build" / "html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PAGES = {
    "index.html": "The SAE scaling book",
    "book/chapters/00_subject_model.html": "The subject model",
    "book/chapters/01_switch_sae.html": "Switch Sparse Autoencoders",
    "book/chapters/05_efficiency.html": "Efficiency",
    "book/scorecard.html": "Scorecard",
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    statuses: list = []

    def log_request(self, code="-", size="-"):
        type(self).statuses.append((self.path, int(code) if str(code).isdigit() else code))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail(f"no built book at {HTML}; run `make build-book` (or `make test`) first")
    _Handler.statuses = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(HTML)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.parametrize("page,title", PAGES.items())
def test_page_loads_with_title_images_and_no_404(server, browser, page, title):
    _Handler.statuses.clear()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/{page}")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.readyState") == "complete"
                                      and b.find_elements(By.TAG_NAME, "h1"))
    browser.execute_async_script(
        "const done = arguments[0];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
        " new Promise(r => { i.onload = i.onerror = r; }))).then(() => done());"
    )
    h1 = browser.execute_script("return Array.from(document.querySelectorAll('h1')).map(e => e.textContent)")
    assert any(title in t for t in h1), f"{page}: no <h1> containing {title!r}; found {h1}"
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
    broken = [src for src, width in images if not width]
    assert not broken, f"{page}: images that did not load: {broken}"
    missing = [path for path, code in _Handler.statuses if code == 404]
    assert not missing, f"{page}: 404 for {missing}"
    assert any(path.startswith(f"/{page}") for path, code in _Handler.statuses if code == 200), _Handler.statuses
    if "chapters/0" in page and "05_" not in page:
        assert len(images) >= 3, f"{page}: expected at least 3 figures, found {len(images)}"
