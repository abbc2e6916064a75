"""The outside programs the monitoring check runs, each on 127.0.0.1 and stopped by its own pid:
a Prometheus server scraping the targets in Ray's service-discovery file, and headless Chromium.

    prometheus = Prometheus(shutil.which("prometheus"), targets_file, workdir)
    prometheus.start()
    prometheus.query('sum(ray_expert_mesh_requests_total)', at=time.time())   # [{"metric", "value"}]
    prometheus.stop()
    chromium(shutil.which("chromium"), url, workdir, "--screenshot=page.png", "--window-size=1400,900")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["Prometheus", "chromium", "free_port", "http_json"]

SCRAPE_INTERVAL_S = 2
_CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, timeout_s: float = 20.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return json.loads(reply.read())


class Prometheus:
    """Prometheus on 127.0.0.1:<free port>, one job `ray` whose targets come from `targets_file`
    (file_sd_configs, as Ray's own generated prometheus.yml has it), scraped every
    SCRAPE_INTERVAL_S; its config, log and storage in `workdir`."""

    def __init__(self, binary: str, targets_file: Path, workdir: Path):
        self.binary, self.targets_file, self.workdir = binary, Path(targets_file), Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        return (f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
                f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
                "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
                f"  - files: ['{self.targets_file}']\n    refresh_interval: 5s\n")

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until /-/ready answers. Raises RuntimeError (with its log's
        tail) if it exits or is not ready in time."""
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config())
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prometheus (pid {self.process.pid}) not ready on {self.url} within {timeout_s} s; "
                           f"log: {self.log_tail()}")

    def log_tail(self, num_chars: int = 2000) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-num_chars:]

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>?params; its `data`. Raises RuntimeError naming the error Prometheus gave."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            reply = http_json(url)
        except urllib.error.HTTPError as exc:
            reply = json.loads(exc.read() or b"{}") or {"error": str(exc)}
        if reply.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        """Instant query at unix time `at`: [{"metric": labels, "value": [t, "v"]}, ...] (a vector)
        or [{"metric": {}, "value": ...}] for a scalar."""
        data = self.api("query", query=expr, time=f"{at:.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def active_targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def chromium(binary: str, url: str, user_data_dir: Path, *args: str, timeout_s: float = 120.0) -> str:
    """Run headless Chromium on `url` once (a new, empty profile in `user_data_dir`; `args` such as
    --screenshot=FILE or --dump-dom) and return its stdout. Chromium and every process it spawned
    run in a session of their own, killed by that session's id when it returns or times out."""
    user_data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, *_CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *args, url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"chromium on {url} still running after {timeout_s} s") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its helpers (crashpad, zygote) if any are left
        except ProcessLookupError:
            pass
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"chromium on {url} exited with {process.returncode}: "
                           f"{err.decode(errors='replace')[-2000:]}")
    return out.decode(errors="replace")
