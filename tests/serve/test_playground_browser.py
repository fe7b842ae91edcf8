"""The playground (docs/playground.md) in a real browser: headless Chromium driven by Selenium, against the
session's tiny-model service (conftest.py), through the page's own buttons.

Chromium and its driver are Debian packages (``scripts/bootstrap.sh`` installs them as root); the system
chromedriver is named explicitly, so Selenium never tries to download one. Without them the tests skip.
"""

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.serve.conftest import MODEL_NAME, side_app

pytestmark = [pytest.mark.ray, pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PROMPT = "The quick brown fox"
# The tiny model's context is 512 tokens; at the ~100 tokens/s the page renders on these 2 cores, the long one
# streams for several seconds, ample time to press Stop mid-stream.
LONG = 480
SHORT = 200


def chromium():
    """A headless Chromium; the caller quits it."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver "
                    "(scripts/bootstrap.sh does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def open_playground(driver, base_url: str) -> None:
    driver.get(f"{base_url}/playground")  # the redirect to playground/ included
    wait_for(lambda: driver.execute_script("return document.getElementById('model').options.length"), 10,
             "the model picker filled from /v1/models")


def fill(driver, **fields) -> None:
    """Type into the page's inputs, by element id (underscores for dashes)."""
    for key, value in fields.items():
        box = driver.find_element("id", key.replace("_", "-"))
        box.clear()
        box.send_keys(str(value))


def state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, service):
    service.wait_idle()
    open_playground(browser, service.base_url)
    return browser


@pytest.fixture
def api(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c


def stats(api) -> dict:
    r = api.get("/playground/stats")
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_appear_incrementally(page, api):
    assert [o.text for o in page.find_elements("css selector", "#model option")] == [MODEL_NAME]
    # Every change of the output while the request runs, seen from inside the page.
    page.execute_script("""
        window.outputLengths = [];
        const out = document.getElementById('output');
        new MutationObserver(() => {
          if (document.body.dataset.state === 'running') window.outputLengths.push(out.textContent.length);
        }).observe(out, {childList: true, subtree: true, characterData: true});""")
    fill(page, prompt=PROMPT, temperature=0, max_tokens=SHORT)
    page.find_element("id", "generate").click()
    polled = []  # and from outside, as a user would see it
    while state(page) in ("idle", "running"):
        polled.append(len(text(page, "output")))
        time.sleep(0.02)
    assert state(page) == "done", text(page, "error")
    final = text(page, "output")
    observed = page.execute_script("return window.outputLengths")
    assert len(set(observed)) >= 10 and observed == sorted(observed), observed
    assert observed[-1] <= len(final)
    partial = {n for n in polled if 0 < n < len(final)}
    assert len(partial) >= 3, f"too few partial states polled: {polled}"
    print(f"{len(set(observed))} output states seen by the page's observer, {len(partial)} partial ones polled")

    # The page shows exactly what the API returns for the same (greedy) request, and its logprobs.
    reference = api.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": SHORT,
                                                  "temperature": 0, "logprobs": 1}).json()["choices"][0]
    assert final == reference["text"]
    assert (text(page, "tokens"), text(page, "finish")) == (str(SHORT), "length")
    assert text(page, "ttft").endswith(" ms") and float(text(page, "tps")) > 0
    assert text(page, "cost").startswith("≤ $")

    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).move_to_element(page.find_element("css selector", "#output .token")).perform()
    tip = page.find_element("id", "tip")
    wait_for(tip.is_displayed, 5, "the logprob tooltip on hover")
    assert f"logprob {reference['logprobs']['token_logprobs'][0]:.3f}" in tip.text


def test_stop_aborts_the_request_and_frees_its_blocks(page, api, service):
    cancelled = sum(s["requests_cancelled"] for s in service.worker_stats().values())
    total = stats(api)["kv"]["total_blocks"]
    fill(page, prompt=PROMPT, temperature=0, max_tokens=LONG)
    page.find_element("id", "generate").click()
    # Mid-stream: tokens on the page, and the workers' heartbeats (every 0.2 s) show the request's blocks.
    wait_for(lambda: text(page, "output"), 10, "the first tokens")
    wait_for(lambda: stats(api)["kv"]["used_blocks"] > 0, 5, "blocks in use while streaming")
    assert state(page) == "running", "the stream ended before Stop could be pressed"
    page.find_element("id", "stop").click()
    wait_for(lambda: state(page) == "stopped", 5, "the page to stop")
    stopped_at = time.monotonic()
    shown = text(page, "output")
    assert 0 < int(text(page, "tokens")) < LONG

    wait_for(lambda: stats(api)["kv"]["free_blocks"] == total, 5, "every KV block free again")
    freed_s = time.monotonic() - stopped_at
    assert all(w["free_blocks"] == w["total_blocks"] for w in stats(api)["workers"])
    # Aborted on its worker (not finished), and nothing more reached the page.
    after = service.worker_stats()
    assert sum(s["requests_cancelled"] for s in after.values()) == cancelled + 1
    assert not any(s["active_request_ids"] for s in after.values())
    assert text(page, "output") == shown
    # The page's own live view, fed by the same endpoint, comes back to an empty pool too.
    wait_for(lambda: text(page, "live-kv").startswith(f"0 / {total} "), 5, "the live view to show a free pool")
    print(f"blocks freed {freed_s:.2f} s after Stop")


def test_the_page_asks_for_the_key_of_a_service_that_needs_one(browser, service):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    engine = service.engine.model_dump(mode="json")
    with side_app(service, "gpt2-page-keys", "/page-keys", engine, api_keys=["sk-page"]) as svc:
        browser.get(f"{svc.base_url}/playground/")  # the page itself needs no key
        alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
        assert "API key" in alert.text
        alert.send_keys("sk-page")
        alert.accept()
        wait_for(lambda: browser.execute_script("return document.getElementById('model').options.length"), 10,
                 "the model picker filled with the key")
        assert browser.execute_script("return sessionStorage.getItem('gpt2serve-api-key')") == "sk-page"
        fill(browser, prompt=PROMPT, temperature=0, max_tokens=8)
        browser.find_element("id", "generate").click()
        wait_for(lambda: state(browser) == "done", 20, "a generation with the key")
        assert text(browser, "tokens") == "8"
        browser.execute_script("sessionStorage.clear()")


@pytest.mark.parametrize("field,value", [("max_tokens", -5), ("temperature", -1)])
def test_bad_input_shows_the_api_error(page, api, field, value):
    expected = api.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, field: value}).json()
    fill(page, prompt=PROMPT, **{field: value})
    page.find_element("id", "generate").click()
    wait_for(lambda: state(page) == "error", 10, "the error state")
    assert page.find_element("id", "error").is_displayed()
    assert text(page, "error") == expected["error"]["message"]
    assert field in expected["error"]["message"] and text(page, "output") == ""


def test_live_view_rates_from_counters():
    """The stats endpoint's arithmetic, without Ray or a browser: sums over workers, rates over the window."""
    from gpt2serve.actors.ingress import LiveView
    from gpt2serve.engine.metrics import WORKER_METRICS, PrometheusBackend

    def families(tokens: float, dollars: float) -> list:
        backend = PrometheusBackend()
        labels = ("m", "r")
        backend.make(WORKER_METRICS["generation_tokens"]).record(tokens, labels)
        backend.make(WORKER_METRICS["cost_dollars"]).record(dollars, labels)
        backend.make(WORKER_METRICS["num_gpus"]).record(1, labels)
        backend.make(WORKER_METRICS["gpu_price_dollars_per_hour"]).record(3.6, labels + ("H100",))
        return backend.families()

    def snapshot(free: dict[str, int]) -> dict:
        stats = {"num_running": 2, "num_waiting": 1, "num_total_blocks": 100}
        return {"num_waiting": 3,
                "workers": {w: {"age_s": 0.1, "stats": {**stats, "num_free_blocks": f}} for w, f in free.items()}}

    live = LiveView(window_s=5.0)
    first = live.update(snapshot({"a": 90, "b": 100}), {"a": families(10, 1.0), "b": families(0, 1.0)}, now=100.0)
    assert first["rates"] == {"window_s": 0.0, "output_tokens_per_s": None, "dollars_per_1m_output_tokens": None}
    assert first["kv"] == {"free_blocks": 190, "total_blocks": 200, "used_blocks": 10, "usage_perc": 5.0}
    assert (first["running"], first["waiting"]) == (4, {"queue": 3, "engines": 2})
    assert first["replica_dollars_per_hour"] == 3.6
    live.update(snapshot({"a": 90, "b": 100}), {"a": families(30, 1.5), "b": families(0, 1.5)}, now=103.0)
    # Worker b was replaced (its counters restarted lower): counted as nothing, not as negative.
    last = live.update(snapshot({"a": 100, "b": 100}), {"a": families(60, 2.0), "b": families(0, 0.5)}, now=105.0)
    assert last["rates"]["window_s"] == 5.0
    assert last["rates"]["output_tokens_per_s"] == 50 / 5.0
    assert last["rates"]["dollars_per_1m_output_tokens"] == 1e6 * 1.0 / 50
    # A worker whose families did not come is left out of the rates, not counted as a drop.
    later = live.update(snapshot({"a": 100, "b": 100}), {"b": families(5, 0.6)}, now=106.0)
    assert (later["rates"]["window_s"], later["rates"]["output_tokens_per_s"]) == (6.0, 5 / 6.0)
