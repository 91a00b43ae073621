"""Start and stop a real ``tritonserver`` on a model repository (``tmanet serve``, and the serving tests).

The server is a ``tritonserver`` on PATH (the NGC Triton container) or else the one inside NVIDIA's
``nvidia-pytriton`` wheel (installed with ``--no-deps``: its own dependencies pin numpy<2). That binary needs
``LD_LIBRARY_PATH`` to include the wheel's ``nvidia_pytriton.libs/`` and a backend directory whose
``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python stub built for
this interpreter's Python version; we assemble that folder in a temporary directory.

The server listens on 127.0.0.1 unless told otherwise (tritonserver alone binds every interface) and keeps the
model control mode ``none``: no remote loading or unloading of models.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tmanet.errors import UserError

READY_TIMEOUT_S = 120.0


def pytriton_dir() -> Path | None:
    """The ``tritonserver`` folder of the installed nvidia-pytriton wheel (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


def server_command(workdir: Path) -> tuple[list[str], dict]:
    """(tritonserver and its backend-directory argument, environment) for this machine."""
    env = dict(os.environ)
    on_path = shutil.which("tritonserver")
    if on_path:
        return [on_path], env
    folder = pytriton_dir()
    if folder is None:
        raise UserError("no tritonserver: run inside the NGC Triton container, or install the server with "
                        "`pip install --no-deps nvidia-pytriton==0.7.0` (see requirements/tritonserver.txt)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = folder / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub} missing)")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True)
    for f in (folder / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(stub, python / stub.name)
    libs = folder.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
    return [str(folder / "bin" / "tritonserver"), f"--backend-directory={workdir / 'backends'}"], env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """A tritonserver process on ``repo``: ``start()`` returns once every model is ready, ``stop()`` ends
    it (SIGINT, then SIGKILL after ``grace_s``). Also a context manager."""

    def __init__(self, repo, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_file=None, verbose: bool = False):
        self.repo = Path(repo)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_file, self.verbose = log_file, verbose
        self.process: subprocess.Popen | None = None
        self._workdir = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "TritonServer":
        if not self.repo.is_dir():
            raise UserError(f"{self.repo} is not a model repository (write one with `tmanet triton-repo`)")
        self._workdir = tempfile.TemporaryDirectory(prefix="tmanet-triton-")
        command, env = server_command(Path(self._workdir.name))
        command += [f"--model-repository={self.repo.resolve()}", "--model-control-mode=none",
                    f"--http-address={self.host}", f"--http-port={self.http_port}",
                    f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                    f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                    "--allow-gpu-metrics=false", "--exit-on-error=true", "--strict-readiness=true",
                    "--exit-timeout-secs=10"]
        if self.verbose:
            command.append("--log-verbose=1")
        out = open(self.log_file, "ab") if self.log_file else None  # None: the server logs to our terminal
        self.process = subprocess.Popen(command, env=env, stdout=out, stderr=out and subprocess.STDOUT,
                                        start_new_session=True)  # our own signals only, not the terminal's
        if out is not None:
            out.close()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float):
        """Poll readiness until ``timeout_s``; fails early if the server exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} before it was "
                                   f"ready{self._log_hint()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:g} s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (log: {self.log_file})" if self.log_file else " (its log is above)"

    def stop(self, grace_s: float = 30.0) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tritonserver unloads its models and exits
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return None if self.process is None else self.process.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
