"""Real servers for tests, started by the test set-up itself and bound to 127.0.0.1 only.

Register with `pytest_plugins = ["tests.servers"]` in tests/conftest.py (or `-p tests.servers`).
Both fixtures are session-scoped: starting a server costs seconds, so one per test run is shared.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["free_port", "mlflow_server_url", "postgres_url"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it; a small race with other
    processes remains until the server binds it, acceptable for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output so that a failure message can show it."""
    return subprocess.run(cmd, capture_output=True, check=False, text=True, **kwargs)  # type: ignore[call-overload]


def _postgres_bindir() -> Path:
    """Directory of Debian's PostgreSQL server binaries, installing the package if absent.
    We use /usr/lib/postgresql/N/bin explicitly: a `pg_ctl` earlier on PATH may be another build."""

    def find() -> Path | None:
        hits = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name))  # newest major version last
        return Path(hits[-1]).parent if hits else None

    if (bindir := find()) is not None:
        return bindir
    if shutil.which("apt-get") is None:
        pytest.skip("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb) and apt-get is unavailable")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    result = _run(install, env=env)
    if result.returncode != 0:  # a stale or empty package index is the usual cause: refresh once and retry
        _run(["apt-get", "update"], env=env)
        result = _run(install, env=env)
    if result.returncode != 0 or (bindir := find()) is None:
        pytest.skip(f"could not install PostgreSQL with apt-get (exit {result.returncode}): "
                    f"{(result.stderr or result.stdout)[-2000:]}")
    return bindir


def _ensure_psycopg2() -> None:
    """SQLAlchemy's postgresql+psycopg2 dialect needs the driver; install it into this interpreter if absent."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        result = _run([sys.executable, "-m", "pip", "install", "-q", "psycopg2-binary"])
        if result.returncode != 0:
            pytest.skip(f"psycopg2 is missing and `pip install psycopg2-binary` failed: {result.stderr[-2000:]}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL cluster with a database `autopeft`, as a SQLAlchemy URL (trust auth, no password)."""
    bindir = _postgres_bindir()
    _ensure_psycopg2()
    # Not pytest's tmp_path: that lives under a root-only 0700 folder the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="autopeft-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    shutil.chown(root, "postgres", "postgres")
    shutil.chown(sockets, "postgres", "postgres")
    # PostgreSQL refuses to run as root, so every server command runs as the `postgres` system user;
    # cwd=root because runuser keeps our cwd, which postgres may not be allowed to read.
    as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    try:
        # -A trust: the generated pg_hba.conf trusts local sockets and 127.0.0.1/::1; --no-locale
        # avoids depending on which locales the machine has generated.
        result = _run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                       "--no-locale", "-E", "UTF8"], cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        # fsync/full_page_writes off: the cluster is thrown away after the run, durability only costs time.
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
                   "-c fsync=off -c full_page_writes=off -c synchronous_commit=off")
        result = _run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                       "-w", "-t", "60", "start"], cwd=root)
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{server_log}")
        result = _run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                       "autopeft"], cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"createdb failed:\n{result.stdout}\n{result.stderr}")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/autopeft"
    finally:
        if (data / "postmaster.pid").exists():
            _run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the whole process group: `mlflow server` forks uvicorn workers that outlive a plain kill."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def running_mlflow_server(root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `mlflow server` (SQLite backend `root/mlflow.db`, proxied artifacts); yields (URL, process)."""
    port = free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # one worker: enough for tests, and starts faster on a small machine
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        # start_new_session: own process group, so teardown can stop the server and its workers together;
        # cwd=root: nothing (mlruns/, mlartifacts/) lands in the project folder.
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:  # connection refused / reset while the server is still starting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer {url}/health within 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server shared by the session's tests; yields its base URL."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (url, _):
        yield url
