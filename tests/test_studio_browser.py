"""`deltatune studio` in a real browser (headless Chromium driven by selenium) on a tiny model: fill the form (with
an upload and a validation error on the way), start a run, watch the curve grow, wait for the metrics, compare,
then get an answer from the new adapter in the playground. A screenshot of each page is saved in the test's temp
folder (and to docs/ with DELTATUNE_UPDATE_SCREENSHOTS=1); each step asserts what the page shows.

Needs Debian's chromium and chromium-driver (`make test` installs them when it runs as root); skipped otherwise."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import sentiment_rows, tiny_bert_folder, write_csv

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[dev])")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="Chromium is not installed (apt-get install chromium chromium-driver)"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio(tmp_path):
    """`deltatune studio` started as a user starts it, on a workspace holding only a tiny model."""
    workspace = tmp_path / "workspace"
    tiny_bert_folder(str(workspace / "models" / "bert"))
    port = free_port()
    log = open(tmp_path / "studio.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "studio", "--workspace", str(workspace), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "api/schema", timeout=2)
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "studio.log").read_text()
            time.sleep(0.3)
    yield url, workspace
    process.terminate()
    process.wait(10)
    for run in workspace.iterdir():  # a run still training when the test failed
        state = run / "studio.json"
        if state.exists():
            pid = json.loads(state.read_text()).get("pid")
            if pid and os.path.exists(f"/proc/{pid}"):
                os.killpg(pid, signal.SIGTERM)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=90, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception:  # noqa: BLE001 - the element may not be there yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(driver, css):
    return driver.find_element("css selector", css).text


def screenshot(driver, tmp_path, page):
    """The whole page (the window grown to its height), saved as <page>.png."""
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(height + 20, 2600)))
    time.sleep(0.3)
    path = tmp_path / f"studio-{page}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("DELTATUNE_UPDATE_SCREENSHOTS"):
        shutil.copy(path, os.path.join(ROOT, "docs", path.name))
    driver.set_window_size(1400, 1000)
    return path


def type_into(driver, css, text):
    field = driver.find_element("css selector", css)
    field.clear()
    field.send_keys(text)


def test_the_whole_flow_in_chromium(studio, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    url, workspace = studio
    rows = [(text, "positive" if label else "negative") for text, label in sentiment_rows(200, seed=5)]
    train = write_csv(str(tmp_path / "upload" / "reviews-train.csv"), rows[:150] + rows[:4])  # 4 copies
    dev = write_csv(str(tmp_path / "upload" / "reviews-dev.csv"), rows[150:])
    driver = browser
    driver.get(url + "#/new")
    wait(driver, lambda d: len(Select(d.find_element("id", "f-method")).options) > 10, what="the form")

    # the form: model, uploaded data, columns, the data report before anything runs
    type_into(driver, "#f-model", "models/bert")
    upload = driver.find_element("id", "upload-input")  # what the "Upload a data file" button opens
    upload.send_keys(train)
    wait(
        driver,
        lambda d: (
            "reviews-train.csv" in Select(d.find_element("id", "f-train_file")).first_selected_option.text
        ),
    )
    upload.send_keys(dev)
    wait(
        driver,
        lambda d: "reviews-dev.csv" in Select(d.find_element("id", "f-eval_file")).first_selected_option.text,
    )
    report = wait(
        driver,
        lambda d: "validation" in text_of(d, "#data-report") and text_of(d, "#data-report"),
        what="the data report",
    )
    duplicates = 154 - len({text for text, _ in rows[:150]})
    assert f"Dropped: {duplicates} duplicates" in report
    assert "Rows read: train 154 (data/reviews-train.csv), validation 50 (data/reviews-dev.csv)" in report
    counts = text_of(driver, "#label-counts")
    assert counts.startswith("label train validation")
    assert Select(driver.find_element("id", "f-label_column")).first_selected_option.text == "label"

    # method and training settings; a wrong value is named next to its field before anything runs
    assert Select(driver.find_element("id", "f-method")).first_selected_option.text == "lora"
    assert driver.find_element("id", "f-lora-r").get_attribute("value") == "8"  # LoraConfig's default
    assert driver.find_element("id", "f-lr").get_attribute("value") == "0.001"  # LoRA's usual learning rate
    type_into(driver, "#f-lora-r", "4")
    type_into(driver, "#f-max_steps", "300")
    type_into(driver, "#f-batch_size", "8")
    type_into(driver, "#f-eval_every", "100")
    type_into(driver, "#f-num_threads", "1")
    type_into(driver, "#f-lr", "-1")
    type_into(driver, "#f-name", "reviews-lora")
    driver.find_element("id", "start").click()
    error = wait(driver, lambda d: text_of(d, '.field[data-key="lr"] .error'), what="the lr error")
    assert "lr must be positive" in error
    assert not (workspace / "reviews-lora").exists()
    type_into(driver, "#f-lr", "0.01")
    driver.find_element("id", "check").click()
    wait(driver, lambda d: "Everything checks out" in text_of(d, "#form-status"), what="the check")
    assert "lora:\n  r: 4" in text_of(driver, "#form-status pre")
    screenshot(driver, tmp_path, "new-run")

    # the run page: the curve grows while it trains, then the final metrics
    driver.find_element("id", "start").click()
    wait(driver, lambda d: d.current_url.endswith("#/runs/reviews-lora"), what="the run page")
    points = (
        "return studio.charts.loss.data.datasets.length ? studio.charts.loss.data.datasets[0].data.length : 0"
    )
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline and text_of(driver, "#run-state") != "finished":
        seen.add(driver.execute_script(points))
        time.sleep(0.15)
    assert text_of(driver, "#run-state") == "finished", text_of(driver, "#run-console")
    growing = sorted(n for n in seen if 0 < n < 300)
    assert len(growing) >= 2, f"the loss curve was seen at {sorted(seen)} points only"
    assert driver.execute_script(points) == 300
    assert text_of(driver, "#run-progress").startswith("Finished: 300 steps")
    metrics = text_of(driver, "#run-metrics")
    assert "eval_accuracy" in metrics and "trainable parameters" in metrics
    assert "adapter_model.safetensors" in text_of(driver, "#run-files")
    screenshot(driver, tmp_path, "run")

    # compare: the run's row with its parameter count
    driver.get(url + "#/compare")
    table = wait(
        driver, lambda d: "reviews-lora" in text_of(d, "#compare-table") and text_of(d, "#compare-table")
    )
    assert "Trainable params" in table and "eval_accuracy" in table
    screenshot(driver, tmp_path, "compare")

    # the playground: an answer from the new adapter, next to the base model's
    driver.get(url + "#/play")
    wait(driver, lambda d: "reviews-lora" in text_of(d, "#play-adapters"), what="the adapters")
    type_into(driver, "#play-text", "a superb and fun film")
    driver.find_element("id", "play-run").click()
    cards = wait(
        driver,
        lambda d: (
            len(d.find_elements("css selector", ".output")) == 2
            and d.find_elements("css selector", ".output")
        ),
        what="the outputs",
    )
    base, adapter = (card.text for card in cards)
    assert base.startswith("(base model)") and adapter.startswith("reviews-lora")
    assert "shared batch" in adapter and adapter.splitlines()[3] in ("positive", "negative")  # the label
    screenshot(driver, tmp_path, "playground")
