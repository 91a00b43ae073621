"""Start and stop a real ``tritonserver`` on a model repository (``tmanet serve``, and the serving tests).

The server is a ``tritonserver`` on PATH (the NGC Triton container) or else the one inside NVIDIA's
``nvidia-pytriton`` wheel (installed with ``--no-deps``: its own dependencies pin numpy<2). That binary needs
``LD_LIBRARY_PATH`` to include the wheel's ``nvidia_pytriton.libs/`` and a backend directory whose
``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python stub built for
this interpreter's Python version; we assemble that folder in a temporary directory.

The server listens on 127.0.0.1 unless told otherwise (tritonserver alone binds every interface) and keeps the
model control mode ``none``: no remote loading or unloading of models.

Reliability: the ports are checked free before the start (naming what holds one); readiness is asked of *our*
process only (alive at every poll, and answering with the unique ``--id`` we gave it); the server dies with the
process that started it (``PR_SET_PDEATHSIG`` on Linux: SIGTERM, Triton's clean shutdown); and the temporary
folder of a server whose owners are all dead is removed at the next start.
"""
from __future__ import annotations

import collections
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import urllib.error
import urllib.request
from pathlib import Path

from tmanet.errors import UserError

READY_TIMEOUT_S = 120.0
WORKDIR_PREFIX = "tmanet-triton-"
OWNERS_FILE = "owners.json"  # [[pid, start time], ...] of the processes using a server's temporary folder


class ServerError(RuntimeError):
    """The server could not start or stopped unexpectedly: one line for the user (``tmanet serve`` exits 1)."""


def pytriton_dir() -> Path | None:
    """The ``tritonserver`` folder of the installed nvidia-pytriton wheel (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


def server_command(workdir: Path) -> tuple[list[str], dict]:
    """(tritonserver and its backend-directory argument, environment) for this machine. The environment names
    this interpreter's packages (:data:`SITE_PACKAGES_ENV`) for the Python stub, which runs the system libpython
    and ignores PYTHONPATH: a repository then holds no path of this machine and can be moved."""
    from .triton_repo import SITE_PACKAGES_ENV, default_site_packages
    env = dict(os.environ)
    if default_site_packages():
        env.setdefault(SITE_PACKAGES_ENV, default_site_packages())
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


# -- who holds a port, who is alive (Linux /proc; best effort elsewhere) -----------------------------------
def port_holder(port: int) -> str | None:
    """'pid N (name)' of a process listening on TCP ``port``, where /proc says (other users' sockets may be
    unreadable); None when unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    name = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({name})"
        except OSError:  # another user's process, or one that just ended
            continue
    return None


def check_ports_free(host: str, ports: dict):
    """ServerError naming every port of ``ports`` ({role: port}) that cannot be bound on ``host`` now."""
    if len(set(ports.values())) < len(ports):
        raise ServerError("the HTTP, gRPC and metrics ports must differ: "
                          + ", ".join(f"{role} {port}" for role, port in ports.items()))
    taken = []
    for role, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
            try:
                s.bind((host, port))
            except OSError as e:
                holder = port_holder(port)
                taken.append(f"{role} port {port} ({holder and 'held by ' + holder or e.strerror})")
    if taken:
        raise ServerError(f"cannot listen on {host}: " + "; ".join(taken) + " (choose free ports with "
                          "--http-port/--grpc-port/--metrics-port, or stop what holds them)")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if it is gone or a
    zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def _owner(pid: int) -> list:
    return [pid, _start_time(pid)]


def _alive(owner) -> bool:
    pid, started = owner
    now = _start_time(int(pid))
    return now is not None and (started in (None, "?") or now in ("?", started))


def remove_stale_workdirs(parent=None) -> list[Path]:
    """Remove the temporary folders of servers whose recorded owners are all dead (a ``tmanet serve`` killed with
    SIGKILL cannot clean up); folders without an owners file (being created) are left alone."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        try:
            owners = json.loads((folder / OWNERS_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owners, list) and not any(_alive(o) for o in owners):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _record_owners(folder: Path, pids):
    tmp = folder / (OWNERS_FILE + ".tmp")
    tmp.write_text(json.dumps([_owner(p) for p in pids]))
    os.replace(tmp, folder / OWNERS_FILE)


def _die_with_parent():
    """A ``preexec_fn``: the child gets its own session (our signals only, not the terminal's) and SIGTERM when
    the thread that started it ends (Linux ``PR_SET_PDEATHSIG``); if that already happened, it exits."""
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec():
        os.setsid()
        if prctl is not None:
            prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(1)
    return preexec


def _triton_error(lines) -> str | None:
    """The last error line of a Triton log (glog format: 'E1204 14:07:27.123456 1234 file.cc:12] "message"'),
    past the CUDA complaints every start on a machine without a GPU makes."""
    for line in reversed(lines):
        if line[:1] == "E" and line[1:5].isdigit() and "] " in line and "Cuda" not in line:
            return line.split("] ", 1)[1].strip().strip('"')
    return None


class TritonServer:
    """A tritonserver process on ``repo``: ``start()`` returns once every model is ready, ``stop()`` ends
    it (SIGINT, then SIGKILL after ``grace_s``). Also a context manager.

    The server's output goes to ``log_file``, else to our stderr, through a pipe we read (its last error line
    becomes the ServerError's message). Start it from a thread that outlives it (the main thread): on Linux it
    gets SIGTERM when the starting thread ends."""

    def __init__(self, repo, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_file=None, verbose: bool = False):
        self.repo = Path(repo)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_file, self.verbose = log_file, verbose
        self.process: subprocess.Popen | None = None
        self.server_id = f"tmanet-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # what only our server answers
        self._workdir: Path | None = None
        self._log_tail = collections.deque(maxlen=200)
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "TritonServer":
        remove_stale_workdirs()
        if not self.repo.is_dir():
            raise UserError(f"{self.repo} is not a model repository (write one with `tmanet triton-repo`)")
        check_ports_free(self.host, {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port})
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        try:
            _record_owners(self._workdir, [os.getpid()])
            command, env = server_command(self._workdir)
            command += [f"--id={self.server_id}", f"--model-repository={self.repo.resolve()}",
                        "--model-control-mode=none",
                        f"--http-address={self.host}", f"--http-port={self.http_port}",
                        f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                        f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                        "--allow-gpu-metrics=false", "--exit-on-error=true", "--strict-readiness=true",
                        "--exit-timeout-secs=10"]
            if self.verbose:
                command.append("--log-verbose=1")
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
            _record_owners(self._workdir, [os.getpid(), self.process.pid])
            self._reader = threading.Thread(target=self._copy_log, args=(self.process.stdout,), daemon=True)
            self._reader.start()
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _copy_log(self, pipe):
        """Copy the server's output to the log file (or our stderr), keeping its tail for error messages."""
        out = open(self.log_file, "ab") if self.log_file else sys.stderr.buffer
        try:
            for line in pipe:
                self._log_tail.append(line.decode("utf-8", "replace").rstrip())
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError):  # our stderr closed: keep draining the pipe
                    pass
        finally:
            if self.log_file:
                out.close()

    def ready(self) -> bool:
        """Our process is running, answers with our server id, and has every model ready."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=2) as r:
                if json.loads(r.read()).get("name") != self.server_id:
                    return False  # another server on this port
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float):
        """Poll readiness until ``timeout_s``; fails early if the server exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self.exit_reason("before it was ready"))
            if self.ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout_s:g} s{self._log_hint()}")

    def exit_reason(self, when: str) -> str:
        """One line: how the server exited and, from its log, why."""
        if self._reader is not None:
            self._reader.join(timeout=5)  # the rest of its output
        why = _triton_error(list(self._log_tail))
        return (f"tritonserver exited with status {self.process.returncode} {when}"
                + (f": {why}" if why else "") + self._log_hint())

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
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return None if self.process is None else self.process.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
