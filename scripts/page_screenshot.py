#!/usr/bin/env python3
"""Drive the service's page at ``/`` in headless Chromium and take a screenshot of it.

Debian's ``chromium`` driven by Selenium through Debian's ``chromium-driver`` (both from apt,
``scripts/install-deploy-deps.sh``; Selenium Manager is never asked to download anything:
both paths are given). ``tests/test_page.py`` drives the page with these same functions; run
by hand against a running service it makes the README's picture::

    python scripts/page_screenshot.py --url http://127.0.0.1:3000 \\
        --image ../shared/data/hymenoptera/val/ants/10308379_1b6c72e180.jpg --image README.md \\
        --out docs/img/page.png [--key API_KEY]

It exits non-zero when no image got an answer (a screenshot must show a real result).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("cnn_codes.page_screenshot")

BROWSERS = ("chromium", "chromium-browser")
DRIVERS = ("chromedriver",)
INSTALL_HINT = "apt-get install chromium chromium-driver (scripts/install-deploy-deps.sh)"

# What the page shows, read in the page itself: one entry per card, in upload order.
_READ_RESULTS_JS = """
const text = (el) => (el ? el.textContent.trim() : null);
return {
  state: document.body.dataset.state || null,
  status: text(document.getElementById("status")),
  model: text(document.getElementById("model")),
  index: text(document.getElementById("index")),
  cards: Array.from(document.querySelectorAll("#results .card")).map((card) => {
    const error = card.querySelector(".item-error");
    const line = card.querySelector(".sparkline polyline");
    const points = (line.getAttribute("points") || "").trim();
    return {
      filename: text(card.querySelector(".filename")),
      error_code: error.hidden ? null : error.dataset.code,
      error: error.hidden ? null : text(error),
      classes: Array.from(card.querySelectorAll(".classes li")).map((li) => ({
        label: text(li.querySelector(".label")),
        probability: Number(li.querySelector(".probability").dataset.value),
      })),
      dim: text(card.querySelector(".dim")) || null,
      sparkline_points: points ? points.split(/\\s+/).length : 0,
      neighbors_note: text(card.querySelector(".neighbors-note")),
      neighbors: Array.from(card.querySelectorAll(".neighbors li")).map((li) => {
        const img = li.querySelector("img");
        return {
          row: Number(li.dataset.row),
          path: li.title,
          score: Number(li.querySelector(".score").dataset.value),
          thumbnail: img.currentSrc || null,
          thumbnail_width: img.complete ? img.naturalWidth : 0,
          thumbnail_error: text(li.querySelector(".thumb-error")),
        };
      }),
    };
  }),
};
"""


def find_chromium() -> tuple[str, str]:
    """Paths of the Chromium browser and its chromedriver.

    Raises:
        FileNotFoundError: either is not installed (the message says how to install both).
    """
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver))
               if path is None]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}")
    return browser, driver  # type: ignore[return-value]


def headless_chromium(width: int = 1280, height: int = 1000) -> Any:
    """A Selenium WebDriver on headless Chromium with a ``width`` x ``height`` window.

    Raises:
        FileNotFoundError: no Chromium or chromedriver (see :func:`find_chromium`).
        ImportError: selenium is not installed (``pip install -e '.[test]'``).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with it
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _wait(driver: Any, condition, timeout: float, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        state = driver.execute_script(_READ_RESULTS_JS)
        raise TimeoutError(f"the page did not {what} within {timeout:g} s; it shows {state}") \
            from None


def open_page(driver: Any, url: str, key: str | None = None, timeout: float = 30) -> dict:
    """Open ``url/``, type ``key`` into the key field (when given) and wait for the page's
    ``GET /metadata`` to answer.

    Returns:
        What the page shows (see :func:`read_results`).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url.rstrip("/") + "/")
    model = driver.find_element(By.ID, "model")
    _wait(driver, lambda d: model.get_attribute("data-state") in ("ready", "error"), timeout,
          "load /metadata")
    if key is not None:
        field = driver.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key, Keys.ENTER)
        _wait(driver, lambda d: model.get_attribute("data-state") == "ready", timeout,
              "load /metadata with the key")
    return read_results(driver)


def analyse(driver: Any, images: Sequence[str | Path], timeout: float = 90) -> dict:
    """Pick ``images`` in the page's file field and wait until every answer (classes, CNN code,
    neighbours and their thumbnails) is on the page.

    Returns:
        What the page shows (see :func:`read_results`).
    """
    from selenium.webdriver.common.by import By

    before = driver.execute_script("return Number(document.body.dataset.finished || 0)")
    field = driver.find_element(By.ID, "images")
    field.send_keys("\n".join(str(Path(p).resolve()) for p in images))
    _wait(driver, lambda d: d.execute_script(
        "return Number(document.body.dataset.finished || 0)") > before, timeout,
        "show the answers")
    return read_results(driver)


def read_results(driver: Any) -> dict:
    """What the page shows: ``state``, ``status``, ``model``, ``index`` and per card
    ``filename``, ``error_code``/``error``, ``classes`` [{label, probability}], ``dim``,
    ``sparkline_points``, ``neighbors`` [{row, path, score, thumbnail_width, ...}]."""
    return driver.execute_script(_READ_RESULTS_JS)


def save_screenshot(driver: Any, out: str | Path, width: int = 1280) -> Path:
    """A PNG of the whole page (the window grown to the page's height) at ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    driver.set_window_size(width, driver.get_window_size()["height"])
    for _ in range(3):  # the window's size includes its frame: fit the viewport to the page
        page, viewport = driver.execute_script(
            "return [Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY),"
            " window.innerHeight]")
        if viewport == page:
            break
        driver.set_window_size(width, driver.get_window_size()["height"] + page - viewport)
    if not driver.save_screenshot(str(out)):
        raise OSError(f"the browser could not write {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    parser.add_argument("--image", action="append", required=True,
                        help="a file to upload (repeat for several; any file: non-images "
                             "show their error)")
    parser.add_argument("--out", default="docs/img/page.png", help="PNG to write")
    parser.add_argument("--key", default=os.environ.get("CNN_CODES_PAGE_KEY"),
                        help="API key to type into the page (default $CNN_CODES_PAGE_KEY)")
    parser.add_argument("--width", type=int, default=1280, help="window width, pixels")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    driver = headless_chromium(width=args.width)
    try:
        open_page(driver, args.url, args.key, timeout=args.timeout)
        shown = analyse(driver, args.image, timeout=args.timeout)
        out = save_screenshot(driver, args.out, width=args.width)
    finally:
        driver.quit()
    answered = [c for c in shown["cards"] if c["classes"]]
    logger.info("%s: %d of %d images answered (%s)", out, len(answered), len(shown["cards"]),
                shown["status"])
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
