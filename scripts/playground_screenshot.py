"""Take the README's screenshot of the browser playground after a comparison run.

    .venv/bin/python scripts/playground_screenshot.py --out docs/playground.png

Starts the server on a free loopback port with the bundled model, opens the playground in headless
chromium (the Debian packages scripts/setup.sh installs), generates four images of "seven" with the
compare switch on, and saves the page once PSNR and speedup are shown. The numbers in the picture
are whatever this machine measured at that moment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from selenium.webdriver.common.by import By

    from tests.browser import chromium_driver, wait_for
    from tests.servers import Server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "playground.png")
    parser.add_argument("--prompt", default="seven")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels")
    args = parser.parse_args()

    server = Server()  # the bundled model (the server's default)
    browser = chromium_driver(args.width, 900, extra_flags=("--hide-scrollbars",))
    try:
        browser.get(server.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "generate").is_enabled(), 300, lambda: "the page never got ready")
        browser.find_element(By.CSS_SELECTOR, f"#labels button[data-label='{args.prompt}']").click()
        for name, value in (("n", args.n), ("seed", args.seed)):
            element = browser.find_element(By.ID, name)
            element.clear()
            element.send_keys(str(value))
        browser.find_element(By.CSS_SELECTOR, "label.switch").click()
        browser.find_element(By.ID, "generate").click()
        wait_for(
            lambda: len(browser.find_elements(By.CSS_SELECTOR, ".comparison")) == args.n,
            600,
            lambda: "the comparison never finished: " + browser.find_element(By.ID, "error").text,
        )
        browser.execute_script("document.activeElement.blur()")
        # the whole page in one picture: grow the window by what the page overflows its viewport
        overflow = browser.execute_script("return document.documentElement.scrollHeight - window.innerHeight")
        if overflow > 0:
            browser.set_window_size(args.width, browser.get_window_size()["height"] + overflow)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        browser.quit()
        server.stop()


if __name__ == "__main__":
    main()
