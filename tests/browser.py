"""A real headless Chromium for tests, driven through selenium and Debian's chromedriver.

`chromium_paths()` finds /usr/bin/chromium and /usr/bin/chromedriver, installing Debian's packages with
apt-get when they are missing, and skips the test (with the reason) when that is impossible.
`headless_chromium(profile)` starts a browser in a fresh profile and quits it afterwards.

The background-networking flags matter on a closed network: without them Chromium's own connections
(component updates, sync, QUIC probes) are refused and slow or break page loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium_paths", "headless_chromium"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", str(exc))


def chromium_paths() -> tuple[Path, Path]:
    """(chromium, chromedriver), installing Debian's packages if either is missing; skips the test if
    they cannot be installed."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return CHROMIUM, CHROMEDRIVER
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing and apt-get is unavailable to install them")
    result = _run(INSTALL)
    if result.returncode != 0:  # a stale or empty package index is the usual cause: refresh once and retry
        _run(["apt-get", "update"])
        result = _run(INSTALL)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        pytest.skip(f"could not install Chromium with `{' '.join(INSTALL)}` (exit {result.returncode}): "
                    + " | ".join(tail))
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"`{' '.join(INSTALL)}` succeeded but {CHROMIUM} or {CHROMEDRIVER} is still missing")
    return CHROMIUM, CHROMEDRIVER


@contextmanager
def headless_chromium(profile: Path, window_size: str = "1400,900") -> Iterator[object]:
    """A selenium WebDriver for a headless Chromium using the fresh profile folder `profile`."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)  # with both paths given, selenium never downloads a driver
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={window_size}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(chromedriver)))
    try:
        yield driver
    finally:
        driver.quit()
