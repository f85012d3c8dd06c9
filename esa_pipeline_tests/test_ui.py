"""The Dagster UI end to end: `dagster dev` on a store holding one materialized sensitivity partition, checked
in headless Chromium. The asset graph shows the pipeline's asset nodes, and the sensitivity partition's page
shows its chart (a PNG embedded as a data URI in the materialization's markdown metadata).

Needs Debian's `chromium` and `chromedriver` (`make ui-deps`). Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MODEL, VARIANT = "tiny-llama", "attention.query__0"
PARTITION = f"{MODEL}|{VARIANT}"
# Nodes of the sensitivity asset's lineage view (architecture_comparison is drawn truncated, so not listed).
GRAPH_NODES = ["experiment_config", "sweep_plan", "model_card", "baseline", "sensitivity", "significance",
               "critical_layers", "scaling_fit", "report"]  # fmt: skip
SERVER_START_S, PAGE_WAIT_S = 100, 60  # each bounded; together well under 3 minutes

EXPERIMENT_YAML = """\
description: UI smoke test on one random-weight tiny model (plumbing only)
protocol: smoke
datasets: [bundled]
window: 64
token_budget: 256
batch_size: 4
seeds: [0]
strengths:
  gaussian: [0.01, 0.1]
components: [attention.query]
layers: all
models:
  tiny-llama: {}
"""

# Run in a subprocess: it needs the environment of the server (DAGSTER_HOME, ESA_*) and must not leave a
# dagster instance or cached models behind in the test process.
MATERIALIZE = textwrap.dedent(f"""
    import os
    from dagster import DagsterInstance, MultiPartitionKey, materialize
    from esa_pipeline.defs import ASSETS
    from esa_pipeline.defs.resources import ExperimentResource, StoreResource

    instance = DagsterInstance.from_config(os.environ["DAGSTER_HOME"])
    instance.add_dynamic_partitions("model", [{MODEL!r}])
    instance.add_dynamic_partitions("variant", [{VARIANT!r}])
    resources = {{"store": StoreResource(), "experiment": ExperimentResource()}}
    for selection, key in (
        (["model_card", "baseline"], {MODEL!r}),
        (["sensitivity"], MultiPartitionKey({{"model": {MODEL!r}, "variant": {VARIANT!r}}})),
    ):
        result = materialize(ASSETS, selection=selection, partition_key=key, resources=resources, instance=instance)
        assert result.success, f"materializing {{selection}} failed"
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_env(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("ui")
    home = base / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    experiment = base / "ui.yaml"
    experiment.write_text(EXPERIMENT_YAML)
    env = {
        **os.environ, "DAGSTER_HOME": str(home), "ESA_STORE_DIR": str(base / "store"),
        "ESA_DB_PATH": str(base / "esa.duckdb"), "ESA_EXPERIMENT": str(experiment),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1",
    }  # fmt: skip
    done = subprocess.run([sys.executable, "-c", MATERIALIZE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=420)  # fmt: skip
    assert done.returncode == 0, f"materializing the sensitivity partition failed:\n{done.stderr[-4000:]}"
    return env


@pytest.fixture(scope="module")
def server(ui_env, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("dagster_dev") / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    with open(log_path, "w") as log:
        # own session: teardown signals the whole group (webserver, daemon, code server) by this pid
        proc = subprocess.Popen([str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=ui_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=3) as response:
                    assert "dagster_webserver_version" in json.load(response)
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"dagster dev did not answer /server_info in {SERVER_START_S}s:\n"
                                f"{log_path.read_text()[-4000:]}")  # fmt: skip
                time.sleep(1)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to dagster dev's process group, then SIGKILL to whatever is left of it (the code server and
    gRPC children outlive the parent by their heartbeat timeout otherwise)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has already exited
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are needed for the UI test: run `make ui-deps` (Debian packages)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="esa-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1600,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_WAIT_S)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver, condition, what: str, timeout: float = PAGE_WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=1).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "ui_timeout.png"))
        pytest.fail(f"{what} did not appear within {timeout}s; see test-artifacts/ui_timeout.png")


def dismiss_welcome_dialog(driver) -> None:
    """The first visit shows a 'Join the Dagster community' dialog over the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Skip']"):
        button.click()


def test_asset_graph_shows_the_pipeline_nodes(server, browser):
    # depth 3 reaches from the config sources to the report; the default depth (1) shows direct neighbours only
    browser.get(f"{server}/assets/sensitivity?view=lineage&lineageDepth=3")
    wait_for(browser, lambda d: dismiss_welcome_dialog(d) or all(n in body_text(d) for n in GRAPH_NODES),
             f"asset nodes {GRAPH_NODES}")  # fmt: skip
    time.sleep(1)  # let the layout settle for the screenshot
    browser.save_screenshot(str(ARTIFACTS / "ui_asset_graph.png"))
    text = body_text(browser)
    missing = [n for n in GRAPH_NODES if n not in text]
    assert not missing, f"asset graph lacks nodes {missing}"


def test_sensitivity_partition_page_shows_its_chart(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/assets/sensitivity?view=partitions&partition={quote(PARTITION, safe='')}")
    wait_for(browser, lambda d: dismiss_welcome_dialog(d) or ("Latest materialization" in body_text(d)
                                                              and "Metadata" in body_text(d)),
             f"the materialization of partition {PARTITION}")  # fmt: skip
    browser.save_screenshot(str(ARTIFACTS / "ui_sensitivity_partition.png"))

    def chart_images(d):
        images = d.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png;base64,']")
        return [im for im in images if d.execute_script("return arguments[0].naturalWidth", im) > 100]

    # markdown metadata sits behind a "[Show Markdown]" link that opens a dialog: try each until one has the chart
    images = chart_images(browser)
    for link in browser.find_elements(By.XPATH, "//*[normalize-space(text())='[Show Markdown]']"):
        if images:
            break
        click_past_overlays(browser, link)
        images = wait_briefly(browser, chart_images)  # the PNG decodes after the dialog opens
        if not images:
            dismiss_markdown_dialog(browser)
    browser.save_screenshot(str(ARTIFACTS / "ui_sensitivity_chart.png"))
    assert images, (
        "no chart image (PNG data URI) in the sensitivity materialization's metadata: the sensitivity asset "
        "should attach MetadataValue.md(charts.png_markdown(charts.to_png(charts.layer_profile_chart(rows))))"
    )
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", images[0])
    assert width >= 400 and height >= 250, f"chart image is only {width}x{height}"


def wait_briefly(driver, condition, timeout: float = 5.0):
    """condition(driver) once it is truthy, or its last (falsy) value after `timeout` seconds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)
    except TimeoutException:
        return condition(driver)


def click_past_overlays(driver, element) -> None:
    """Click `element`; if a dialog's backdrop is in the way (the welcome dialog can open after the page has
    rendered, and a closing dialog fades out), close it, wait for the backdrop to go and click again."""
    from selenium.common.exceptions import ElementClickInterceptedException

    try:
        element.click()
    except ElementClickInterceptedException:
        dismiss_welcome_dialog(driver)
        dismiss_markdown_dialog(driver)
        element.click()


def dismiss_markdown_dialog(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    # the backdrop fades out: clicking the next link before it is gone hits the backdrop instead
    wait_for(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, ".bp5-overlay-backdrop"),
             "the markdown dialog to close")  # fmt: skip
