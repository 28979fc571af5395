"""An OpenAI-compatible chat server over transformers, for machines without vLLM (CPUs).

``/v1/models``, ``/v1/chat/completions`` (streaming or not) and ``/v1/completions``, with the
model's chat template. One worker thread owns the model: waiting non-streaming requests are
batched (left padding, one ``generate`` per batch of equal sampling settings), streaming ones run
alone through a ``TextIteratorStreamer``. Malformed requests get OpenAI-style 400s, bodies over
``max_body`` bytes 413 (before they are read), an unknown model name 404; with an API key, other
requests get 401. Bodies are parsed and prompts tokenized off the event loop, so a large request
never stalls the small ones beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)
BODY_TIMEOUT = 30.0  # seconds for a request's body to arrive whole


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore

    model: str | None = None
    # strict: "10" and true are client mistakes (400), not 10 and 1
    max_tokens: StrictInt | None = Field(default=None, gt=0)
    max_completion_tokens: StrictInt | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)  # torch's 64 bits


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Req):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Req):
    prompt: str = Field(min_length=1)  # no token to continue from


@dataclass
class _Job:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[str, str, int] | None = None  # text, finish reason, completion tokens
    error: BaseException | None = None
    streamer: Any = None


class Generator:
    """Owns the model; a worker thread serves jobs from a queue, batching compatible ones."""

    def __init__(self, model_path: str, max_batch: int = 16, default_max_tokens: int = 512):
        from fusechat.eval.chat import load_chat_model

        self.model, self.tok, self.eos = load_chat_model(model_path)
        self.device = self.model.get_input_embeddings().weight.device
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.max_context = getattr(self.model.config, "max_position_embeddings", 4096)
        self.jobs: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    # -- worker
    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            while first.streamer is None and len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt.streamer is None and _key(nxt) == _key(first):
                    batch.append(nxt)
                else:
                    self.jobs.put(nxt)  # another kind: its own turn
                    break
            try:
                self._generate(batch)
            except BaseException as e:  # reported to the waiting requests
                log.exception("generation failed")
                for j in batch:
                    j.error = e
                    if j.streamer is not None:
                        j.streamer.end()
            for j in batch:
                j.done.set()

    @torch.inference_mode()
    def _generate(self, batch: list[_Job]) -> None:
        n = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), n), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, j in enumerate(batch):
            ids[i, n - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            attn[i, n - len(j.prompt_ids) :] = 1
        j0 = batch[0]
        if j0.seed is not None:
            torch.manual_seed(j0.seed)
        sample = j0.temperature > 0
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            max_new_tokens=max(j.max_new_tokens for j in batch),
            do_sample=sample,
            temperature=j0.temperature if sample else None,
            top_p=j0.top_p if sample else None,
            eos_token_id=self.eos,
            pad_token_id=self.tok.pad_token_id,
            streamer=j0.streamer,
        )
        for i, j in enumerate(batch):
            gen = out[i, n:].tolist()[: j.max_new_tokens]
            finish = "length"
            for k, t in enumerate(gen):
                if t in self.eos:
                    gen, finish = gen[:k], "stop"
                    break
            text = self.tok.decode(gen, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, j.stop)
            j.result = (text, "stop" if stopped else finish, len(gen))

    # -- API side
    def job(self, prompt: str, req: _Req, stream: bool = False) -> _Job:
        # chat templates write BOS themselves; a raw completion prompt is taken as given
        prompt_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        want = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        room = self.max_context - len(prompt_ids)
        if room <= 0:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}"
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        j = _Job(prompt_ids, min(want, room), req.temperature, req.top_p, stop, req.seed)
        if stream:
            from transformers import TextIteratorStreamer

            j.streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        self.jobs.put(j)
        return j


def _key(j: _Job) -> tuple:
    return (j.temperature, j.top_p, j.seed)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


class _Reject(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if p != "body")
    return f"{where}: {err['msg']}" if where else err["msg"]


MAX_BODY = 4 << 20  # bytes: about a million tokens of text, far beyond any context served here


class _Api:
    """The endpoints' work, apart from their routes: parsing, completing, streaming."""

    def __init__(self, gen: Generator, served_name: str, max_body: int):
        self.gen, self.name, self.max_body = gen, served_name, max_body

    async def parse(self, request: Request, cls: type[_Req]) -> _Req:
        """The request body as ``cls``: size checked before reading, parsed in a thread; a
        body that does not arrive within ``BODY_TIMEOUT`` seconds is a 408 (a client that
        sends a few bytes and stalls must not hold a connection for ever)."""
        chunks: list[bytes] = []

        async def read() -> int:
            size = 0
            async for chunk in request.stream():  # read as it arrives: the loop stays free
                size += len(chunk)
                if size <= self.max_body:
                    chunks.append(chunk)
                elif size > 16 * self.max_body:
                    break  # draining so the client can read the 413 has its limits too
            return size

        try:
            size = await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise _Reject(408, f"request body not received within {BODY_TIMEOUT:g} s") from None
        except (
            ClientDisconnect
        ):  # gone before its body arrived: an answer nobody reads, no traceback
            raise _Reject(400, "client disconnected before the request body arrived") from None
        if size > self.max_body:
            raise _Reject(413, f"request body over {self.max_body} bytes (the server's limit)")
        body = b"".join(chunks)
        try:
            req = await asyncio.to_thread(cls.model_validate_json, body)
        except ValidationError as e:
            raise _Reject(400, _validation_message(e)) from None
        if req.model not in (None, self.name):
            raise _Reject(404, f"model {req.model!r} does not exist (serving {self.name!r})",
                          "model_not_found")  # fmt: skip
        return req

    async def complete(self, prompt: str, req: _Req, chat: bool):
        try:
            job = await asyncio.to_thread(self.gen.job, prompt, req, req.stream)
        except ValueError as e:
            return _error(400, str(e))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            return StreamingResponse(self.stream(job, rid, chat), media_type="text/event-stream")
        await asyncio.to_thread(job.done.wait)
        if job.error is not None:
            return _error(500, f"generation failed: {job.error}", "server_error")
        text, finish, n_out = job.result
        choice = {"index": 0, "finish_reason": finish}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_out,
                 "total_tokens": len(job.prompt_ids) + n_out}  # fmt: skip
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                "choices": [choice], "usage": usage}  # fmt: skip

    def chunk(self, rid: str, chat: bool, delta: str | None, finish: str | None,
              first: bool = False) -> str:  # fmt: skip
        """One server-sent event of a streamed answer."""
        if chat:
            d = (
                {"role": "assistant", "content": ""}
                if first
                else ({"content": delta} if delta else {})
            )
            c = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            c = {"index": 0, "text": delta or "", "finish_reason": finish}
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": [c]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, job: _Job, rid: str, chat: bool):
        if chat:
            yield self.chunk(rid, chat, None, None, first=True)
        it = iter(job.streamer)
        sent = ""
        while True:
            piece = await asyncio.to_thread(next, it, None)
            if piece is None:
                break
            cut, stopped = _cut_at_stop(sent + piece, job.stop)
            if cut[len(sent) :]:
                yield self.chunk(rid, chat, cut[len(sent) :], None)
            sent = cut
            if stopped:
                break
        await asyncio.to_thread(job.done.wait)
        yield self.chunk(rid, chat, None, job.result[1] if job.result else "stop")
        yield "data: [DONE]\n\n"


def create_app(
    model_path: str,
    served_name: str,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
    **kw,
) -> FastAPI:
    gen = Generator(model_path, **kw)  # a model that cannot load is one FusechatError line
    api = _Api(gen, served_name, max_body)
    app = FastAPI(title=f"fusechat serve {served_name}")
    created = int(time.time())

    @app.exception_handler(_Reject)
    async def _rejected(request: Request, exc: _Reject):
        return _error(exc.status, exc.message, exc.kind)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model",
                                            "created": created, "owned_by": "fusechat"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await api.parse(request, ChatRequest)
        msgs = [m.model_dump() for m in req.messages]
        try:
            prompt = await asyncio.to_thread(
                gen.tok.apply_chat_template, msgs, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template that rejects this conversation
            return _error(400, f"messages: {e}")
        return await api.complete(prompt, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await api.parse(request, CompletionRequest)
        return await api.complete(req.prompt, req, chat=False)

    return app
