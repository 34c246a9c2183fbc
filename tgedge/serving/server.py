"""`tgedge serve`: the real `tritonserver` on a model repository, started, waited for, and stopped cleanly.

Which server: `--tritonserver PATH`, else one on PATH (a Triton container's, with its backends), else the one
nvidia-pytriton bundles (2.51, Python backend only). pytriton's server needs a backend directory holding the
Python-backend stub built for this interpreter's Python version (copied into a temporary workspace, as pytriton
does), its own libraries on LD_LIBRARY_PATH, and this interpreter's libpython there first: the stub links
`libpython3.X.so`, and the system's may be another build than the one running tgedge. TGEDGE_SITE names this
environment's site directories for the models' Python (the model.py files `tgedge triton` writes read it).

The server runs in its own process group (its Python-backend stubs with it) and is stopped by SIGTERM to the
group, SIGKILL after a grace period; it also dies with this process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tgedge.errors import TgedgeError

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 10.0
# What a CPU-only machine logs as errors at every start (no CUDA driver, no NVML): not why a start failed.
GPU_NOISE = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory", "CUDA driver")
_PR_SET_PDEATHSIG = 1


@dataclass
class TritonInstall:
    """A tritonserver binary and what it needs around it."""
    binary: Path
    backends: Path | None = None  # a backend directory to pass (None: the server's own default)
    stub: Path | None = None  # the Python-backend stub to put in it (pytriton ships one per Python version)
    libs: list[Path] = field(default_factory=list)  # prepended to LD_LIBRARY_PATH
    source: str = ""


def pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (dist / "bin" / "tritonserver").exists():
        return None
    if not stub.exists():
        raise TgedgeError(f"nvidia-pytriton at {root} has no Python-backend stub for Python {version}")
    return TritonInstall(dist / "bin" / "tritonserver", dist / "backends", stub,
                         [root.parent / "nvidia_pytriton.libs"], f"nvidia-pytriton ({root})")


def find_tritonserver(binary: str | Path | None = None) -> TritonInstall:
    """The server to run: the one named, else tritonserver on PATH, else nvidia-pytriton's."""
    if binary is not None:
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TgedgeError(f"{binary}: not an executable tritonserver")
        return TritonInstall(path, source=str(path))
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), source=on_path)
    bundled = pytriton_install()
    if bundled is None:
        raise TgedgeError("no tritonserver found: install tgedge[serve] (nvidia-pytriton bundles one, Linux x86-64, "
                          "Python <= 3.12), put one on PATH (a Triton container), or pass --tritonserver PATH")
    return bundled


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the OS picks it; another process could still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def site_directories() -> list[str]:
    """This environment's site directories (a venv's first), for the server's Python backend."""
    dirs = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def error_line(log: list[str]) -> str:
    """The reason the server gives in its log: a model's load failure from its status table, else its first error
    line (`E<date> ... file.cc:N] "message"`) that is not about a missing GPU, else its last line."""
    for line in log:
        m = re.match(r"^\|\s*(\S+)\s*\|\s*\S+\s*\|\s*(UNAVAILABLE: .*?)\s*\|$", line)
        if m:
            return f"model {m.group(1)}: {m.group(2)}"
    for line in log:
        m = re.match(r"^E\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$", line)
        if m and not any(gpu in line for gpu in GPU_NOISE):
            return m.group(1).strip().strip('"')
    tail = [line for line in log if line.strip()]
    return tail[-1].strip() if tail else "no output"


class TritonServer:
    """`with TritonServer(repo) as server:` a started, ready server; stopped (process group) at the end."""

    def __init__(self, repository: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, host: str = LOOPBACK, tritonserver: str | Path | None = None,
                 echo: bool = False, extra_args: tuple[str, ...] = ()):
        from tgedge.serving.repository import check_repository

        self.repository = Path(repository)
        self.models = check_repository(repository)  # every model the server must load, or one line on what is not
        self.install = find_tritonserver(tritonserver)
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.echo = echo
        self.extra_args = tuple(extra_args)
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.process: subprocess.Popen | None = None
        self._workspace: Path | None = None
        self._shm_prefix = f"tgedge-{os.getpid()}-{secrets.token_hex(3)}-"

    # -- addresses --------------------------------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        return LOOPBACK if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.http_port}"

    # -- start / stop -----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [str(self.install.binary), f"--model-repository={self.repository.resolve()}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
               "--strict-readiness=true", "--exit-timeout-secs=5",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        if self._workspace is not None:
            cmd.append(f"--backend-directory={self._workspace / 'backends'}")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [sysconfig.get_config_var("LIBDIR") or "", *map(str, self.install.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env["TGEDGE_SITE"] = os.pathsep.join(site_directories())
        return env

    def _prepare(self) -> None:
        """pytriton's layout: its backends copied with the stub for this Python put in the python backend."""
        if self.install.backends is None:
            return
        self._workspace = Path(tempfile.mkdtemp(prefix="tgedge-triton-"))
        backends = self._workspace / "backends"
        shutil.copytree(self.install.backends, backends)
        shutil.copy2(self.install.stub, backends / "python" / "triton_python_backend_stub")

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self._prepare()
        try:
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as e:
            self._cleanup()
            raise TgedgeError(f"{self.install.binary}: cannot start tritonserver ({e.strerror})") from None
        threading.Thread(target=self._read_log, daemon=True).start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            if self.echo:
                print(line, file=sys.stderr, flush=True)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                time.sleep(0.2)  # let the log reader catch the last lines
                raise TgedgeError(f"tritonserver exited with code {code} before it was ready: "
                                  f"{error_line(list(self.log))}")
            if self.ready():
                return
            time.sleep(0.25)
        raise TgedgeError(f"tritonserver not ready after {timeout:.0f} s: {error_line(list(self.log))}")

    def check_models(self) -> None:
        """Every model of the repository is READY on the server (its repository index), or one line naming those
        that are not: ready means every model answers, not only the server's health."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                index = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TgedgeError(f"{self.http_url}: the repository index did not answer ({e})") from None
        state = {m.get("name"): m for m in index if isinstance(m, dict)}
        bad = [f"{name} ({state.get(name, {}).get('state') or 'not loaded'}"
               f"{': ' + state[name]['reason'] if state.get(name, {}).get('reason') else ''})"
               for name in self.models if state.get(name, {}).get("state") != "READY"]
        if bad:
            raise TgedgeError(f"{self.repository}: not every model is ready: {'; '.join(bad)}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM to the server's process group (its stubs included), SIGKILL after `grace` seconds."""
        code = None
        if self.process is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    code = self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._kill_group()
        self._cleanup()
        return code

    def _kill_group(self) -> None:
        """Stubs outliving the server (they should not) go with the group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _cleanup(self) -> None:
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):  # a killed stub's shared memory
            try:
                leftover.unlink()
            except OSError:
                pass

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
