"""The CPU OpenAI-compatible server (official `openai` client) and MT-Bench end to end against it,
with a scripted OpenAI-compatible judge."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import SHARED, start_server
from fastapi import FastAPI

from fusechat.errors import FusechatError
from fusechat.eval.mtbench import chat_with_retries, parse_rating, run_mt_bench
from fusechat.eval.server import create_app
from fusechat.io import free_port

MT_BENCH = SHARED / "data" / "mt_bench"


@pytest.fixture(scope="module")
def app(toy_world):
    return create_app(str(toy_world / "openchat-mini"), "openchat-mini", max_batch=16)


@pytest.fixture(scope="module")
def server(app) -> str:
    return start_server(app)


def test_openai_client_chat_stream_completions(server):
    c = openai.OpenAI(base_url=server, api_key="none")
    assert [m.id for m in c.models.list().data] == ["openchat-mini"]
    msgs = [{"role": "user", "content": "What is the capital of Fenpuzor?"}]
    r = c.chat.completions.create(
        model="openchat-mini", messages=msgs, max_tokens=24, temperature=0
    )
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    chunks = list(c.chat.completions.create(model="openchat-mini", messages=msgs, max_tokens=24,
                                            temperature=0, stream=True))  # fmt: skip
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == text  # greedy: the same answer either way
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    p = "GPT4 Correct User: What is 2 + 3?<|end_of_turn|>GPT4 Correct Assistant:"
    comp = c.completions.create(model="openchat-mini", prompt=p, max_tokens=8, temperature=0)
    assert comp.choices[0].text
    stop = c.completions.create(model="openchat-mini", prompt=p, max_tokens=8, temperature=0,
                                stop=[comp.choices[0].text[:2]])  # fmt: skip
    assert stop.choices[0].finish_reason == "stop" and len(stop.choices[0].text) < 2


@pytest.mark.parametrize(
    "path,body",
    [
        ("/chat/completions", {"messages": []}),
        ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}),
        ("/completions", {"max_tokens": 5}),
        ("/completions", {"prompt": "x" * 5000}),  # longer than the context
        ("/completions", {"prompt": "", "max_tokens": 4}),  # nothing to continue
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 1, "seed": 2**80},
        ),  # fmt: skip
    ],
)
def test_malformed_requests_get_400(server, path, body):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server + path, data=json.dumps({"model": "openchat-mini", **body}).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400
    assert "message" in json.loads(e.value.read())["error"]


def _post(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_model_404_and_oversized_body_413_without_stalling_others(toy_world):
    url = start_server(
        create_app(str(toy_world / "openchat-mini"), "openchat-mini", max_body=1 << 20)
    )
    ask = {"messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 4}
    code, body = _post(url + "/chat/completions", json.dumps({**ask, "model": "gpt-4"}).encode())
    assert code == 404 and "gpt-4" in body["error"]["message"]
    small = json.dumps({**ask, "model": "openchat-mini", "temperature": 0}).encode()
    _post(url + "/chat/completions", small)  # warm
    t0 = time.perf_counter()
    assert _post(url + "/chat/completions", small)[0] == 200
    alone = time.perf_counter() - t0
    huge = json.dumps({"model": "openchat-mini", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()  # fmt: skip
    results = {}
    big = threading.Thread(
        target=lambda: results.update(big=_post(url + "/chat/completions", huge))
    )
    big.start()
    t0 = time.perf_counter()
    code, _ = _post(url + "/chat/completions", small)
    beside = time.perf_counter() - t0
    big.join()
    assert code == 200 and beside < alone + 0.5, (alone, beside)
    code, body = results["big"]
    assert code == 413 and str(1 << 20) in body["error"]["message"], body


def test_a_body_that_stalls_gets_408_and_others_are_served(server, monkeypatch):
    """A client that sends its headers and one byte of a 1,000-byte body, then nothing: its
    request times out (408) while a normal request is answered at once."""
    import socket

    from fusechat.eval import server as srv

    monkeypatch.setattr(srv, "BODY_TIMEOUT", 1.0)
    host, port = server.split("//")[1].split("/")[0].split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(20)]
    for s in slow:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: 1000\r\n\r\n{")  # fmt: skip
    t0 = time.perf_counter()
    status, _ = _post(server + "/chat/completions",
                      json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 2, "temperature": 0}).encode())  # fmt: skip
    assert status == 200 and time.perf_counter() - t0 < 5
    for s in slow:
        s.settimeout(10)
        assert s.recv(64).startswith(b"HTTP/1.1 408")
        s.close()


def test_the_open_file_limit_is_one_warning_line_per_interval():
    """asyncio's traceback for each failed accept() at the open-file limit becomes one
    warning line, at most every 30 s; other records pass untouched."""
    import logging

    from fusechat.eval.serving import AcceptLimitLog

    now = [100.0]
    f = AcceptLimitLog(300, every=30.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            import sys

            return logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, (), sys.exc_info())

    first = record("socket.accept() out of system resource\nsocket: <fd=6>")
    assert f.filter(first) and first.levelname == "WARNING" and first.exc_info is None
    assert first.getMessage().startswith("at the open-file limit (300): new connections wait")
    now[0] += 5
    assert not f.filter(record("socket.accept() out of system resource"))
    other = record("Task exception was never retrieved")
    assert f.filter(other) and other.exc_info is not None and other.levelname == "ERROR"
    now[0] += 30
    assert f.filter(record("socket.accept() out of system resource"))


def _status(url: str, body: bytes) -> int:
    """The HTTP status of one POST (any body: uvicorn's own 503 is plain text)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_stalled_headers_are_closed_and_connections_capped(app):
    """Clients that connect and send nothing or half their headers are disconnected after the
    header timeout; while they wait a normal request is answered at once, and beyond the
    connection cap a request gets 503 at once instead of waiting."""
    import socket

    url = start_server(app, header_timeout=1.5, max_connections=8)
    host, port = url.split("//")[1].split("/")[0].split(":")
    ask = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "temperature": 0}).encode()  # fmt: skip
    t_open = time.perf_counter()
    slow = [socket.create_connection((host, int(port))) for _ in range(6)]
    for s in slow[1:]:  # the first sends nothing at all
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    t0 = time.perf_counter()
    assert _status(url + "/chat/completions", ask) == 200  # 7 of 8 connections
    assert time.perf_counter() - t0 < 3
    slow += [socket.create_connection((host, int(port))) for _ in range(2)]
    t0 = time.perf_counter()
    assert _status(url + "/chat/completions", ask) == 503  # the 9th: refused, not queued
    assert time.perf_counter() - t0 < 1.0
    for s in slow:
        s.settimeout(10)
        assert s.recv(64) == b""  # closed by the server, without a response
        s.close()
    assert 1.5 <= time.perf_counter() - t_open < 6
    assert _status(url + "/chat/completions", ask) == 200


def test_an_endpoint_that_fails_is_named():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    with pytest.raises(FusechatError) as e:
        asyncio.run(chat_with_retries(client, retries=1, model="m",
                                      messages=[{"role": "user", "content": "hi"}]))  # fmt: skip
    assert str(e.value).startswith(f"endpoint {url}: failed after 2 tries: Connection error")


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(FusechatError, match=r"config\.json: not valid JSON"):
        create_app(str(tmp_path), "broken")
    (tmp_path / "config.json").write_text("{}")  # JSON, but no model there
    with pytest.raises(FusechatError, match="cannot load the model"):
        create_app(str(tmp_path), "broken")


def test_api_key_and_32_concurrent_requests(toy_world):
    """32 concurrent requests, greedy and seeded sampling mixed, each with its own question:
    every answer equals the one the same request gets alone (a batch never mixes answers)."""
    url = start_server(create_app(str(toy_world / "openchat-mini"), "m", api_key="sesame"))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong").models.list()
    held = [
        json.loads(x) for x in (toy_world / "corpus" / "heldout.jsonl").read_text().splitlines()
    ]
    asks = [held[(i * 7) % len(held)]["messages"][0]["content"] for i in range(32)]
    sampling = [dict(temperature=0) if i % 3 else dict(temperature=0.9, seed=i) for i in range(32)]

    def kw(i: int) -> dict:
        msgs = [{"role": "user", "content": asks[i]}]
        return dict(model="m", max_tokens=12, messages=msgs, **sampling[i])

    client = openai.AsyncOpenAI(base_url=url, api_key="sesame")

    async def many():
        return await asyncio.gather(*[client.chat.completions.create(**kw(i)) for i in range(32)])

    together = [r.choices[0].message.content for r in asyncio.run(many())]
    sync = openai.OpenAI(base_url=url, api_key="sesame")
    alone = [sync.chat.completions.create(**kw(i)).choices[0].message.content for i in range(32)]
    assert together == alone
    assert len(set(together)) >= 16  # different questions, different answers: a swap shows


# --------------------------------------------------------------------------- MT-Bench


def _scripted_judge() -> tuple[FastAPI, list]:
    """An OpenAI-compatible judge: rating (question_id % 9) + 1, none for ids divisible by 10."""
    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        prompt = body["messages"][-1]["content"]
        seen.append(body)
        qid = next(q["question_id"] for q in QUESTIONS if q["turns"][0] in prompt)
        text = "I cannot rate this." if qid % 10 == 0 else f"Fine. Rating: [[{qid % 9 + 1}]]"
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}  # fmt: skip

    return app, seen


QUESTIONS = (
    [json.loads(x) for x in (MT_BENCH / "question.jsonl").read_text().splitlines() if x]
    if (MT_BENCH / "question.jsonl").exists()
    else []
)
needs_mt_bench = pytest.mark.skipif(
    not QUESTIONS, reason=f"MT-Bench data not found at {MT_BENCH} (FUSECHAT_SHARED sets it)"
)


def test_parse_rating():
    assert parse_rating("Rating: [[7]]") == 7 and parse_rating("score [8.5]") == 8.5
    assert parse_rating("no rating here") == -1


@needs_mt_bench
def test_mt_bench_all_80_questions_then_resume(server, tmp_path):
    judge_app, seen = _scripted_judge()
    judge = start_server(judge_app)
    out = tmp_path / "mt"
    table = run_mt_bench(str(MT_BENCH), [("openchat-mini", server)], judge, "gpt-4", str(out),
                         concurrency=16, max_tokens=16)  # fmt: skip
    answers = [
        json.loads(x)
        for x in (out / "model_answer" / "openchat-mini.jsonl").read_text().splitlines()
    ]
    assert len(answers) == 80
    assert all(
        set(a) >= {"question_id", "answer_id", "model_id", "choices", "tstamp"} for a in answers
    )
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    judg = [
        json.loads(x)
        for x in (out / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()
    ]
    assert len(judg) == 160
    assert all(set(j) >= {"question_id", "model", "judge", "user_prompt", "judgment", "score",
                          "turn", "tstamp"} for j in judg)  # fmt: skip
    # math/reasoning/coding used the reference-answer prompts
    cats = {q["question_id"]: q["category"] for q in QUESTIONS}
    for j in judg:
        math = cats[j["question_id"]] in ("math", "reasoning", "coding")
        assert j["judge"][1].startswith("single-math-v1" if math else "single-v1")
        assert j["judge"][1].endswith("-multi-turn") == (j["turn"] == 2)
    assert {j["score"] for j in judg if j["question_id"] % 10 == 0} == {-1}
    kept = [q["question_id"] % 9 + 1 for q in QUESTIONS if q["question_id"] % 10]
    assert table["openchat-mini"]["average"] == pytest.approx(sum(kept) / len(kept))
    assert table["openchat-mini"]["turn 1"] == pytest.approx(sum(kept) / len(kept))
    assert (out / "radar.png").exists()
    # resume: drop the last 5 answers and their judgments; only those are redone
    ans_file = out / "model_answer" / "openchat-mini.jsonl"
    lines = ans_file.read_text().splitlines()
    dropped = {json.loads(x)["question_id"] for x in lines[-5:]}
    ans_file.write_text("\n".join(lines[:-5]) + "\n")
    jfile = out / "model_judgment" / "gpt-4_single.jsonl"
    jfile.write_text("".join(x + "\n" for x in jfile.read_text().splitlines()
                             if json.loads(x)["question_id"] not in dropped))  # fmt: skip
    n_calls = len(seen)
    again = run_mt_bench(str(MT_BENCH), [("openchat-mini", server)], judge, "gpt-4", str(out),
                         concurrency=16, max_tokens=16)  # fmt: skip
    assert len(seen) - n_calls == 10  # two turns for each of the five
    assert len(ans_file.read_text().splitlines()) == 80
    assert again["openchat-mini"]["average"] == pytest.approx(table["openchat-mini"]["average"])


@needs_mt_bench
def test_recipe_eval_stage_runs_mt_bench(toy_world, tmp_path):
    """`fusechat run` with eval kind mt-bench: each model served, answered, judged."""
    import yaml

    from fusechat.cli import main

    judge_app, _ = _scripted_judge()
    judge = start_server(judge_app)
    raw = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "mini.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "runs")
    raw["models"]["sources"] = raw["models"]["sources"][:1]  # one source: no merge step
    raw["data"]["max_rows"] = 64
    raw["train"].update(max_steps=2, batch_size=16, micro_batch_size=16, clm_baseline=False)
    raw["eval"] = {"kind": "mt-bench", "questions": str(MT_BENCH / "question.jsonl"),
                   "max_questions": 3, "max_new_tokens": 8, "serve_backend": "hf",
                   "judge": {"base_url": judge, "model": "scripted"}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    summary = json.loads((tmp_path / "runs" / "mini" / "summary.json").read_text())
    want = sum(q["question_id"] % 9 + 1 for q in QUESTIONS[:3]) / 3  # ids 81-83: none is -1
    assert set(summary["scores"]) == {"openchat-mini", "nh2-mixtral-mini",
                                      "openchat-mini--nh2-mixtral-mini"}  # fmt: skip
    for sc in summary["scores"].values():
        assert sc["average"] == pytest.approx(want) and "writing" in sc
    answers = tmp_path / "runs" / "mini" / "eval" / "mt-bench" / "model_answer"
    assert len(list(answers.glob("*.jsonl"))) == 3
