"""Screenshot of the playground after a generation, for docs/images/playground.png.

Starts the tiny CPU service (scripts/tiny_service.py, its own Ray instance, workers priced as one pretend GPU at
$3.60 per hour so that the cost figures are not zero), generates in headless Chromium with the browser test's
helpers, hovers a token so that its logprob tooltip shows, and saves the page:

    .venv/bin/python scripts/playground_screenshot.py --out docs/images/playground.png
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs/images/playground.png"))
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from selenium.webdriver.common.action_chains import ActionChains

    from tests.serve.test_playground_browser import chromium, fill, open_playground, state, wait_for

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    service = subprocess.Popen([sys.executable, str(ROOT / "scripts/tiny_service.py"), "--port", str(ports[0]),
                                "--metrics-export-port", str(ports[1])], stdout=subprocess.PIPE, text=True)
    driver = None
    try:
        for line in service.stdout:
            if line.startswith("READY "):
                url = json.loads(line[len("READY "):])["url"]
                break
        else:
            raise SystemExit("the tiny service exited before it was ready")
        driver = chromium()
        open_playground(driver, url)
        fill(driver, prompt=args.prompt, temperature=0.8, seed=7, max_tokens=args.max_tokens)
        driver.find_element("id", "generate").click()
        wait_for(lambda: state(driver) != "running", 60, "the generation")
        time.sleep(2.5)  # a few live-view refreshes, so that its rates cover the generation
        tokens = driver.find_elements("css selector", "#output .token")
        ActionChains(driver).move_to_element(tokens[len(tokens) // 3]).perform()
        wait_for(lambda: driver.find_element("id", "tip").is_displayed(), 5, "the tooltip")
        driver.save_screenshot(args.out)
        print(f"wrote {args.out} ({state(driver)}, {len(tokens)} token spans)")
    finally:
        if driver is not None:
            driver.quit()
        service.terminate()
        service.wait(60)


if __name__ == "__main__":
    main()
