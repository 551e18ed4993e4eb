"""`autopeft ui` in a real browser: a finished search's trial runs show up in the rendered MLflow page.

A 2-trial search on the tiny BERT writes mlflow.db; `autopeft ui` serves it on 127.0.0.1; headless
Chromium (Debian's, driven by selenium + chromedriver) opens the experiment's runs page, lets the React
app render, expands the parent run `ui` and finds `trial-0` and `trial-1` nested under it, with links to
the run ids the REST API reports. A screenshot is kept as a test artifact; Ctrl-C then stops the server.

Why selenium and not `chromium --dump-dom --virtual-time-budget`: the runs grid renders the parent run
collapsed (its children show only after a click on the expander, and the expansion state lives in
localStorage, not in the URL), and under virtual time the grid sometimes rendered no rows at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from tests_support import AUTOPEFT

from tests.browser import chromium_paths, headless_chromium
from tests.servers import free_port

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read().decode())


def wait_until_serving(base: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, f"`autopeft ui` exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            api(base, "experiments/search?max_results=10")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`autopeft ui` did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_with_ctrl_c(server: subprocess.Popen) -> None:
    """SIGINT to the whole process group, as Ctrl-C in a terminal; every process in it must exit."""
    os.killpg(server.pid, signal.SIGINT)
    assert server.wait(timeout=30) == 0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(server.pid, 0)  # anything left in the group (mlflow server, workers, job runners)?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    pytest.fail("processes of `autopeft ui` were still running 30 s after Ctrl-C")


@pytest.mark.slow
def test_ui_shows_the_trial_runs_in_a_real_browser(tmp_path: Path, tiny_search_args: list[str]) -> None:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    chromium_paths()  # installs Debian's chromium + chromium-driver if missing, or skips with the reason

    done = subprocess.run([*AUTOPEFT, "search", "--trials", "2", "--study", "ui", *tiny_search_args],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file()

    port, log = free_port(), tmp_path / "ui.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen([*AUTOPEFT, "ui", "--port", str(port)], cwd=tmp_path, start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(base, server, log)

        # What the store holds, from the REST API: one parent run `ui` with the two trials nested under it.
        experiment_id = api(base, "experiments/get-by-name?experiment_name=autopeft")["experiment"]["experiment_id"]
        runs = api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
        ids = {run["info"]["run_name"]: run["info"]["run_id"] for run in runs}
        assert set(ids) == {"ui", "trial-0", "trial-1"}
        for run in runs:
            if run["info"]["run_name"].startswith("trial-"):
                tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
                assert tags.get("mlflow.parentRunId") == ids["ui"]

        # What the browser renders: the parent row, then (after expanding it) the trials nested under it.
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def run_link(driver, name: str):
            """The rendered link to run `name` in the runs grid, or None."""
            for link in driver.find_elements(By.CSS_SELECTOR, f"a[href$='/runs/{ids[name]}']"):
                if link.is_displayed() and link.text.strip() == name:
                    return link
            return None

        shot = tmp_path / "mlflow-ui.png"
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        with headless_chromium(profile) as driver:
            driver.get(f"{base}/#/experiments/{experiment_id}/runs")
            wait = WebDriverWait(driver, 45, poll_frequency=0.25,
                                 ignored_exceptions=(StaleElementReferenceException,))
            parent = wait.until(lambda d: run_link(d, "ui"), message="the parent run `ui` never rendered")

            if run_link(driver, "trial-0") is None:  # collapsed: click the expander in the run-name cell
                expander = parent.find_element(
                    By.XPATH, "./ancestor::div[contains(concat(' ', @class, ' '), ' ag-cell ')][1]//button")
                expander.click()
            trials = wait.until(lambda d: (t0 := run_link(d, "trial-0")) and (t1 := run_link(d, "trial-1"))
                                and [t0, t1], message="trial-0 / trial-1 never rendered under the parent run")

            parent = run_link(driver, "ui")
            for trial in trials:  # nested: below the parent row and indented to its right
                assert trial.rect["y"] > parent.rect["y"]
                assert trial.rect["x"] > parent.rect["x"]
            hrefs = {link.text.strip(): link.get_attribute("href") for link in [parent, *trials]}
            assert hrefs == {name: f"{base}/#/experiments/{experiment_id}/runs/{ids[name]}"
                             for name in ("ui", "trial-0", "trial-1")}
            assert driver.save_screenshot(str(shot))

        assert shot.stat().st_size > 10_000
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "mlflow-ui.png")

        stop_with_ctrl_c(server)
    finally:
        try:  # whatever failed above, leave nothing of the server running
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)
