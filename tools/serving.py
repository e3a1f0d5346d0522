"""Loopback SGLang servers for the e2e tests, the demo and the benchmarks.

``with running_server(T, draft_model_path=D, algorithm="DSDE") as s: s.generate(...)``
starts ``python -m sglang.launch_server`` on 127.0.0.1 in its own process group, waits
for ``/health``, and stops it (the whole group) on exit. CPU-only environment:
``cpu_server_env``; command line: ``server_command``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

#: Ports for test servers: below Linux's ephemeral range (32768-60999), so the kernel
#: does not hand the port to some outgoing connection between our check and the
#: server's bind (seen in CI: a port from ``bind(0)`` was taken 1 s later).
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A loopback TCP port that is free now, outside the ephemeral range."""
    import random

    rng = random.Random()  # seeded from the OS: concurrent test runs must not agree
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORT_RANGE}")


def cpu_server_env(extra: dict | None = None) -> dict:
    """Environment for a CPU SGLang server process."""
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One intra-op thread: on a small shared machine a second OpenMP thread that gets
    # descheduled stalls every op (measured here under load: 13 tok/s with 1 thread,
    # 1.4 tok/s with 2). Export OMP_NUM_THREADS to choose otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


def server_command(
    model_path,
    *,
    port: int,
    draft_model_path=None,
    algorithm: str | None = "STANDALONE",
    num_steps: int | None = 4,
    max_total_tokens: int = 4096,
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``python -m sglang.launch_server`` command line for a CPU server."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--device", "cpu",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-total-tokens", str(max_total_tokens),
        "--log-level", "warning",
        "--skip-server-warmup",
        # An idle scheduler otherwise busy-polls (~half a core each on CPU).
        "--sleep-on-idle",
    ]
    if algorithm and draft_model_path is not None:
        cmd += [
            "--speculative-algorithm", algorithm,
            "--speculative-draft-model-path", str(draft_model_path),
            "--speculative-eagle-topk", "1",
            # SGLang folds the accept counters into the lifetime average that
            # /server_info reports only when it logs decode stats: log every step.
            "--decode-log-interval", "1",
        ]
        if num_steps is not None:  # None: the server's default (DSDE: its initial SL)
            cmd += ["--speculative-num-steps", str(num_steps),
                    "--speculative-num-draft-tokens", str(num_steps + 1)]
    return cmd + list(extra_args)


class ServerError(RuntimeError):
    """A non-200 answer from the server (status code and body kept)."""

    def __init__(self, status_code: int, body: str):
        super().__init__(f"HTTP {status_code}: {body[:500]}")
        self.status_code = status_code
        self.body = body


class ServerProcess:
    """A running SGLang server on loopback (see :func:`launch_server`)."""

    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path):
        self.proc = proc
        self.base_url = base_url
        self.log_path = log_path

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- requests ------------------------------------------------------------------
    def generate(self, text=None, *, input_ids=None, max_new_tokens: int = 32,
                 rid: str | None = None, timeout: float = 300, **sampling) -> dict:
        """POST /generate (greedy unless ``sampling`` says otherwise); the JSON answer."""
        import requests

        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
        params.update(sampling)
        payload = {"sampling_params": params}
        if rid is not None:
            payload["rid"] = rid
        if input_ids is not None:
            payload["input_ids"] = input_ids
        else:
            payload["text"] = text
        r = requests.post(f"{self.base_url}/generate", json=payload, timeout=timeout)
        if r.status_code != 200:
            raise ServerError(r.status_code, r.text)
        return r.json()

    def stream_generate(self, text, *, max_new_tokens: int = 32, rid: str | None = None,
                        timeout: float = 300, **sampling):
        """POST /generate with ``stream``; yields each JSON chunk as it arrives."""
        import requests

        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
        params.update(sampling)
        payload = {"text": text, "sampling_params": params, "stream": True}
        if rid is not None:
            payload["rid"] = rid
        with requests.post(f"{self.base_url}/generate", json=payload, stream=True,
                           timeout=timeout) as r:
            if r.status_code != 200:
                raise ServerError(r.status_code, r.text)
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    return
                yield json.loads(data)

    def chat(self, content: str, *, max_tokens: int = 64, timeout: float = 300) -> dict:
        import requests

        r = requests.post(
            f"{self.base_url}/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": content}],
                  "temperature": 0.0, "max_tokens": max_tokens},
            timeout=timeout,
        )
        r.raise_for_status()
        return r.json()

    def abort(self, rid: str) -> None:
        import requests

        requests.post(f"{self.base_url}/abort_request", json={"rid": rid},
                      timeout=30).raise_for_status()

    def server_info(self) -> dict:
        import requests

        r = requests.get(f"{self.base_url}/server_info", timeout=30)
        r.raise_for_status()
        return r.json()

    def accept_length(self) -> float | None:
        """The cumulative average accept length the server reports (None if absent)."""
        info = self.server_info()
        for state in info.get("internal_states", []) or []:
            if "avg_spec_accept_length" in state:
                return float(state["avg_spec_accept_length"])
        return None

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.base_url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    # -- lifecycle -----------------------------------------------------------------
    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class PortInUse(RuntimeError):
    """The server could not bind its port: another process holds it."""


def launch_server(cmd: Sequence[str], *, env: dict | None = None,
                  startup_timeout: float = 300, log_dir=None) -> ServerProcess:
    """Start ``cmd`` (from :func:`server_command`) in its own process group and wait,
    polling ``/health``, until it serves; raise with the log tail if it dies or times out."""
    import requests

    port = int(cmd[list(cmd).index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}"
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sglang-dsde-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            env=env if env is not None else cpu_server_env(),
                            start_new_session=True)
    log.close()
    server = ServerProcess(proc, base_url, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = server.log_path.read_text(errors="replace")
            if "address already in use" in log:
                raise PortInUse(f"port {port} was taken before the server bound it")
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)  # poll interval, not synchronisation
    server.stop()
    raise TimeoutError(f"server not healthy after {startup_timeout}s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(model_path, **kwargs) -> Iterator[ServerProcess]:
    """``with running_server(T, draft_model_path=D) as s: s.generate(...)``.

    Keyword arguments go to :func:`server_command`, except ``env``, ``startup_timeout``
    and ``log_dir`` which go to :func:`launch_server`.
    """
    launch_kw = {k: kwargs.pop(k) for k in ("env", "startup_timeout", "log_dir") if k in kwargs}
    fixed_port = kwargs.pop("port", None)
    for attempt in range(3):
        port = fixed_port or free_port()
        try:
            server = launch_server(server_command(model_path, port=port, **kwargs), **launch_kw)
            break
        except PortInUse:  # another process took the port first: try a new one
            if fixed_port or attempt == 2:
                raise
    try:
        yield server
    finally:
        server.stop()
