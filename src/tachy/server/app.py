"""The OpenAI-compatible HTTP layer: validate, tokenize, queue a Job, turn engine pieces into OpenAI JSON.

Everything a client can get wrong is answered with a 4xx in OpenAI's error format before the request takes a
queue slot (schema, model name, chat template, context window, drafter name); the generation itself runs in
the scheduler's worker thread (scheduler.py). Responses and stream chunks carry OpenAI's fields plus a
``tachy`` field (speed and, per streamed piece, which tokens were drafted) that OpenAI clients ignore.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..decoding import GenerationConfig
from ..decoding.constraint_compiler import CompilerBusy, ConstraintCompiler
from ..decoding.structured import Constraint
from ..engine import Engine
from ..generation import GenerationResponse, GenerationStats
from ..errors import ContextLengthError, InvalidArgumentError, TachyError
from ..sampling import MAX_LOGIT_BIAS
from ..speculative.drafters import DRAFTERS, make_drafter
from ..tokenizer import check_token_ids, is_unicode
from .http_errors import ApiError, BodyGuard, ClientGone, install_error_handlers
from .metrics import Metrics
from .schemas import MAX_STOP, MAX_STOP_CHARS, ChatCompletionRequest, CompletionRequest, _Sampling, error_body
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown
from .tools import ToolPlan

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 128   # prompts x n of one request: each is a generation that the others would queue behind
# a search strategy's width multiplies its memory and time, and a search holds the worker until it ends
SEARCH_LIMITS = {"num_beams": 16, "num_samples": 16, "top_k": 64}


def create_app(engine: Engine, api_key: str | None = None, max_queue: int = 64, model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, grace_s: float = 30.0, warmup: bool = True,
               max_batch: int = 8, compile_timeout_s: float = 10.0, stall_s: float = 60.0,
               speculative_batching: bool = True, preempt_after: int = 256, whole_prompt_tokens: int = 0,
               min_prompt_chunk: int = 4, prefill_share: float = 0.5) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (default: the engine's name).

    max_queue: requests that may wait while one runs; more get 429. grace_s: how long shutdown lets the
    running request finish before ending it. max_batch: how many overlapping requests decode together (one
    forward per step, scheduler.py); 1 runs them one at a time. speculative_batching: rows draft, and with the
    C forward joining prompts are prefilled in chunks beside them (False: plain rows). compile_timeout_s: the
    time budget of one structured-output constraint (compiled in a child process, constraint_compiler.py);
    over it a 400.
    stall_s: /health answers 503 "stalled" when the worker has made no progress for this long while busy.
    preempt_after: in a full batch with requests waiting, a row is parked after this many tokens of its turn
    so that they get its cache row (fairness; 0: never, a row keeps its cache row until it finishes).
    whole_prompt_tokens, min_prompt_chunk: speculative batching's prompt reading beside running rows
    (``BatchDecoder``'s whole_prompt_tokens and min_chunk): quicker first tokens, slower running streams.
    prefill_share: what a joining prompt's chunk may cost, as a share of the running rows' tokens' forward
    (``BatchDecoder``'s prefill_share): higher reads joining prompts sooner, at the running streams' latency.
    """
    model_name = model_name or engine.name
    metrics = Metrics()
    metrics.prefix_cache = engine.prefix_cache
    if warmup:
        engine.warmup()  # kernels' one-time setup now, not in the first user's latency
        engine.load_drafter("default")
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics, grace_s=grace_s, max_batch=max_batch,
                          speculative_batching=speculative_batching, preempt_after=preempt_after,
                          batch_options=dict(whole_prompt_tokens=whole_prompt_tokens, min_chunk=min_prompt_chunk,
                                             prefill_share=prefill_share))
    compiler = ConstraintCompiler(engine.tokenizer, engine.config.vocab_size, timeout_s=compile_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        compiler.close()
        await asyncio.to_thread(scheduler.close)

    # with an API key the API's description is not served to anyone (/docs, /redoc, /openapi.json)
    public = {} if api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="tachy", version="0.1.0", lifespan=lifespan, **public)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.state.compiler = compiler
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes, metrics=metrics)
    install_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def health_report() -> dict:
        """The health check's answer: status "ok", "stalled" when the worker has been busy without progress
        for ``stall_s`` (a load balancer should route elsewhere or restart the process) or "shutting_down"
        while stopping. Also ``app.state.health`` for hosts that check health without HTTP (Ray Serve)."""
        stalled = scheduler.stalled_for()
        status = "shutting_down" if scheduler.closed else "stalled" if stalled > stall_s else "ok"
        return {"status": status, "model": model_name, "queue_depth": scheduler.queue_depth,
                "running": scheduler.running, "seconds_since_progress": round(stalled, 1)}

    app.state.health = health_report

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 "ok"; 503 "stalled" or "shutting_down" (health_report)."""
        report = health_report()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "tachy",
                  "max_model_len": engine.max_context}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(check_key)])
    async def model(model: str) -> dict:   # the openai client's models.retrieve; names may hold "/"
        _check_model(model, model_name)
        return model_card

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_common(body, model_name)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for legacy in ("functions", "function_call"):
            if getattr(body, legacy) is not None:   # ignoring it would answer in text where a call was asked
                raise ApiError(400, f"{legacy} is OpenAI's deprecated form of function calling; use tools and "
                                    "tool_choice", param=legacy)
        if any(m != "text" for m in body.modalities or []) or body.audio is not None:
            raise ApiError(400, "tachy answers in text only (modalities: [\"text\"]); audio output is not "
                                "supported", param="modalities" if body.audio is None else "audio")
        if body.web_search_options is not None:
            raise ApiError(400, "web search is not supported by tachy's server", param="web_search_options")
        if not engine.tokenizer.has_chat_template:
            raise ApiError(400, f"model {model_name!r} has no chat template (a base model); "
                                f"use /v1/completions", param="messages", code="no_chat_template")
        tools = ToolPlan(body.tools, body.tool_choice)
        if tools.active and body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "response_format cannot be combined with tools (a tool call is already "
                                "constrained to its parameters' schema)", param="response_format")
        # tokenizing a large prompt takes a while: off the event loop
        messages = tools.messages([m.as_dict() for m in body.messages])
        extra = {}
        if body.tachy.passages is not None:
            prompt_ids, extra = await asyncio.to_thread(_with_passages, engine, messages, body.tachy)
        else:
            prompt_ids = await asyncio.to_thread(engine.chat_prompt, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prediction = await _prediction(body, engine)
        constraint = await _constraint(compiler, body, tools.response_format())
        work = _work([prompt_ids], body, max_tokens, engine, constraint, logprobs, extra, prediction)
        return await _respond(request, scheduler, work, body, model_name, chat=True, tokenizer=engine.tokenizer,
                              tools=tools)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        _check_common(body, model_name)
        if body.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported by tachy's server", param="suffix")
        if body.best_of not in (None, body.n):
            raise ApiError(400, "best_of (returning the best of several samples) is not supported; use n",
                           param="best_of")
        if body.tachy.passages is not None:
            raise ApiError(400, "tachy.passages is for chat completions (the question is the last user message)",
                           param="tachy.passages")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs (log-probabilities of the prompt) is not supported",
                           param="echo")
        prompt = body.prompt
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if not isinstance(prompt, str) and not isinstance(prompt[0], str):   # token ids, one list or several
            prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
            try:
                for ids in prompts:
                    check_token_ids(ids, engine.config.vocab_size)
            except InvalidArgumentError as e:
                raise ApiError(400, str(e), param="prompt") from None
        else:
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = await asyncio.to_thread(lambda: [engine.tokenizer.encode(t) for t in texts])
        prediction = await _prediction(body, engine)
        work = _work(prompts, body, body.max_tokens, engine, await _constraint(compiler, body), body.logprobs,
                     prediction=prediction)
        echo = [engine.tokenizer.decode(p) for p, _ in work] if body.echo else None
        return await _respond(request, scheduler, work, body, model_name, chat=False, tokenizer=engine.tokenizer,
                              echo=echo)

    return app


# -- request -> work ----------------------------------------------------------------------------------------
def _check_common(body: _Sampling, model_name: str) -> None:
    where = _invalid_unicode(body.model_dump())
    if where is not None:
        raise ApiError(400, f"{where}: invalid Unicode (a lone surrogate such as \\ud800); send UTF-8 text",
                       param=where, code="invalid_unicode")
    _check_model(body.model, model_name)
    stops = body.stop_list()
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not stop for stop in stops):   # it would match at once, before any text: not a stop
        raise ApiError(400, "stop strings must not be empty", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ApiError(400, f"stop strings are at most {MAX_STOP_CHARS} characters", param="stop")
    structured = (body.response_format is not None and body.response_format.type != "text") or \
        bool(getattr(body, "tools", None))
    if body.ignore_eos and structured:   # a finished constraint allows only the end-of-text token
        raise ApiError(400, "ignore_eos cannot be combined with response_format or tools", param="ignore_eos")
    drafter = body.tachy.drafter
    if ":" in drafter:  # options could name server files (a datastore): only the server's operator sets them
        raise ApiError(400, "drafter options are not accepted in requests; pass a drafter name",
                       param="tachy.drafter")
    if drafter != "none" and drafter not in DRAFTERS:
        make_drafter(drafter)  # raises UnknownNameError listing the available drafters


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def _invalid_unicode(value) -> str | None:
    """The path of the first string (or key) in a parsed body that is not valid Unicode, else None. JSON may
    escape lone surrogates (``"\\ud800"``); Python keeps them in str, and no tokenizer can encode them."""
    todo = [("", value)]
    while todo:   # iterative: a deeply nested schema must not exhaust the stack
        path, item = todo.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                return path or "body"
        elif isinstance(item, dict):
            todo.extend((f"{path}.{k}".lstrip("."), k) for k in item if isinstance(k, str))
            todo.extend((f"{path}.{k}".lstrip("."), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return None


async def _prediction(body: _Sampling, engine: Engine) -> list[int] | None:
    """The prediction's token ids, tokenized once, off the worker and the event loop. Over the context window
    it is a 400 (no answer repeats more of it): each choice's row used to tokenize it and build a suffix
    automaton over it on the worker thread while the other rows waited (a 1 MB prediction: 0.85 s and 230 MB
    per choice)."""
    if body.prediction is None:
        return None
    ids = await asyncio.to_thread(engine.tokenizer.encode, body.prediction.text, add_special_tokens=False)
    if len(ids) > engine.max_context:
        raise ApiError(400, f"the prediction has {len(ids)} tokens, over the context window of "
                            f"{engine.max_context}", param="prediction")
    return ids


async def _constraint(compiler: ConstraintCompiler, body: _Sampling,
                      response_format: dict | None = None) -> Constraint | None:
    """The request's structured-output constraint (its response_format, or the one given: tool calls),
    compiled off the worker and the event loop."""
    param = "tools" if response_format is not None else "response_format"   # the field a 400 names
    if response_format is None and body.response_format is not None:
        response_format = body.response_format.as_config()
    if response_format is None:
        return None
    if response_format.get("regex") == "":   # the library reads "" as no constraint: free text, silently
        raise ApiError(400, "response_format regex is empty; leave response_format out for free text",
                       param=param, code="invalid_response_format")
    try:
        found, constraint = compiler.cached(response_format)
        if not found:
            constraint = await asyncio.wrap_future(compiler.submit(response_format))
    except CompilerBusy as e:
        raise ApiError(429, str(e), type="rate_limit_exceeded", code="compiler_busy") from None
    except InvalidArgumentError as e:
        message = str(e) if param == "response_format" else f"a tool's parameters: {e}"
        raise ApiError(400, message, param=param, code="invalid_response_format") from None
    return constraint


PASSAGES_MARK = "\u27e6tachy passages\u27e7"   # where the passages go in the rendered conversation


def _with_passages(engine: Engine, messages: list[dict], options) -> tuple[list[int], dict]:
    """APE's parts of a chat request with passages: the conversation rendered with the passages where the
    last user message begins, split there into the shared prefix and the question; returns (prefix + question
    ids, GenerationConfig fields). Special-token text in the messages and passages stays text, as in
    chat_prompt (Tokenizer.chat_id_parts, encode_literal)."""
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise ApiError(400, "tachy.passages needs the last message to be the user's question (text)",
                       param="tachy.passages")
    marked = messages[:-1] + [{**messages[-1], "content": PASSAGES_MARK + messages[-1]["content"]}]
    parts = engine.tokenizer.chat_id_parts(marked, add_generation_prompt=True, split_at=PASSAGES_MARK)
    if len(parts) != 2:
        raise ApiError(400, "this model's chat template does not keep the question intact; tachy.passages "
                            "cannot be placed", param="tachy.passages")
    prefix, question = parts
    passages = [engine.tokenizer.encode_literal(p) for p in options.passages]
    if not prefix or not all(passages):
        raise ApiError(400, "empty passage or prefix", param="tachy.passages")
    return prefix + question, {"passages": passages, "passages_at": len(prefix),
                               "ape_temperature": options.ape_temperature, "ape_scale": options.ape_scale}


def _work(prompts: list[list[int]], body: _Sampling, max_tokens: int | None, engine: Engine,
          constraint: Constraint | None, logprobs: int | None = None, extra: dict | None = None,
          prediction: list[int] | None = None) -> list[tuple[list[int], GenerationConfig]]:
    """(prompt ids, config) per choice: each prompt ``n`` times, seeds ``seed, seed + 1, ...``; ``extra``:
    more GenerationConfig fields (APE's passages). APE's passages count toward the context window with the
    prompt: their K/V are all held at once, and each is read on the worker, so unbounded they let one request
    hold gigabytes and the worker for minutes (64 passages of 3,000 tokens: 192k tokens' K/V)."""
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} choices; at most "
                            f"{MAX_CHOICES} per request", param="n")
    bias = _logit_bias(body.logit_bias, engine)
    passage_tokens = sum(len(p) for p in (extra or {}).get("passages") or [])
    work = []
    for prompt_ids in prompts:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.max_context - len(prompt_ids) - passage_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" plus {max_tokens} new tokens" if max_tokens is not None and room >= 1 else ""
            passages = f" (its passages {passage_tokens})" if passage_tokens else ""
            raise ContextLengthError(f"this model's context window is {engine.max_context} tokens; the prompt "
                                     f"has {len(prompt_ids) + passage_tokens}{passages}{asked}")
        for i in range(body.n):
            work.append((prompt_ids, GenerationConfig(
                max_new_tokens=max_tokens or room,
                temperature=_temperature(body.temperature),
                top_p=1.0 if body.top_p is None else body.top_p,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias, ignore_eos=body.ignore_eos,
                seed=None if body.seed is None else (body.seed + i) % 2**63, stop=body.stop_list(),
                drafter=body.tachy.drafter, max_draft_tokens=body.tachy.max_draft_tokens,
                strategy=body.tachy.strategy, strategy_options=body.tachy.strategy_options,
                watermark=body.tachy.watermark, press=body.tachy.press,
                compression_ratio=body.tachy.compression_ratio, prefix_cache=body.tachy.prefix_cache,
                attention=body.tachy.attention,
                prediction=prediction,
                response_format=constraint, logprobs=logprobs, **(extra or {}))))
    _check_search(work[0][1])
    return work


def _logit_bias(bias: dict[str, float] | None, engine: Engine) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as strings) as GenerationConfig takes it, every id in the vocabulary."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        # int() raises past 4,300 digits (a 500); no vocabulary has ids of more than 18
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 18 else -1
        if not 0 <= token < engine.config.vocab_size:
            raise ApiError(400, f"logit_bias keys must be token ids below {engine.config.vocab_size}, got "
                                f"{key[:32]!r}", param="logit_bias")
        if not abs(value) <= MAX_LOGIT_BIAS:   # NaN fails too
            raise ApiError(400, f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                                f"{value} for token {token}", param="logit_bias")
        out[token] = value
    return out


def _check_search(config: GenerationConfig) -> None:
    """A 400 for a strategy wider than SEARCH_LIMITS (``num_beams: 10**6`` asks terabytes; ``num_samples: 10**9``
    holds the worker thread, and every request queued behind it, for good unless its client cancels)."""
    for name, limit in SEARCH_LIMITS.items():
        value = getattr(config.decoding, name, None)
        if isinstance(value, int) and value > limit:
            raise ApiError(400, f"strategy {config.decoding.name!r}: {name} must be at most {limit}, got {value}",
                           param="tachy.strategy_options")


def _temperature(value: float | None) -> float:
    """OpenAI's default is 1. Below 1e-6 the distribution is the argmax anyway, so such temperatures run as
    greedy decoding (greedy verification of drafts, no sampling generator), as llama.cpp does."""
    if value is None:
        return 1.0
    return 0.0 if value < 1e-6 else value


# -- work -> response ---------------------------------------------------------------------------------------
class _Reader:
    """Reads a job's channel; while waiting, notices a client that went away and cancels the job (``watch``;
    a StreamingResponse watches for disconnects itself)."""

    def __init__(self, job: Job, request: Request):
        self.job, self.request = job, request
        self.watch = True
        self._get: asyncio.Future | None = None
        self._checked = time.monotonic()

    async def next(self) -> tuple:
        while True:
            if self._get is None:
                self._get = asyncio.ensure_future(self.job.channel.get())
            done, _ = await asyncio.wait({self._get}, timeout=0.5)
            # checked every half second even while pieces flow: a non-streamed answer sends nothing until the end
            if self.watch and time.monotonic() - self._checked > 0.5:
                self._checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.close()
                    raise ClientGone()
            if done:
                item, self._get = self._get.result(), None
                return item

    def close(self) -> None:
        self.job.cancelled.set()
        if self._get is not None:
            self._get.cancel()


def _raise_for(exc: Exception) -> None:
    if isinstance(exc, TachyError):
        raise exc
    if isinstance(exc, ShuttingDown):
        raise ApiError(503, str(exc), type="server_error", code="shutting_down")
    raise exc


async def _respond(request: Request, scheduler: Scheduler, work, body: _Sampling, model_name: str, chat: bool,
                   tokenizer, echo: list[str] | None = None, tools: ToolPlan | None = None):
    job = Job(work, asyncio.get_running_loop())
    try:
        scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(429, str(e), type="rate_limit_exceeded", code="queue_full") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    reader = _Reader(job, request)
    first = await reader.next()
    if first[0] == "error":
        reader.close()
        _raise_for(first[2])
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": rid, "created": int(time.time()), "model": model_name}
    prompt_tokens = sum(len(p) + sum(len(x) for x in c.passages or []) for p, c in work[::body.n])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reader.watch = False
        events = _stream(reader, first, meta, chat, len(work), prompt_tokens, include_usage, tokenizer, echo,
                         tools)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(reader, first, meta, chat, len(work), prompt_tokens, tokenizer, echo, tools)


async def _pieces(reader: _Reader, first: tuple) -> AsyncIterator[tuple]:
    item = first
    while item[0] != "end":
        yield item
        item = await reader.next()


async def _collect(reader: _Reader, first: tuple, meta: dict, chat: bool, choices: int, prompt_tokens: int,
                   tokenizer, echo: list[str] | None, tools: ToolPlan | None) -> JSONResponse:
    texts = list(echo) if echo else [""] * choices
    finish: list[str | None] = [None] * choices
    logprobs: list[list | None] = [None] * choices
    stats: list[GenerationStats] = [GenerationStats() for _ in range(choices)]
    async for kind, index, payload in _pieces(reader, first):
        if kind == "error":
            _raise_for(payload)
        texts[index] += payload.text
        stats[index] = payload.stats
        finish[index] = payload.finish_reason or finish[index]
        if payload.logprobs is not None:
            logprobs[index] = (logprobs[index] or []) + payload.logprobs
    completion_tokens = sum(s.generated_tokens for s in stats)
    if chat:
        out = []
        for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs)):
            calls = tools.parse(t) if tools is not None else None
            message = {"role": "assistant", "content": t} if calls is None else \
                {"role": "assistant", "content": None, "tool_calls": calls}
            out.append({"index": i, "message": message, "finish_reason": f if calls is None else "tool_calls",
                        "logprobs": _logprobs_json(lp, tokenizer, chat=True)})
    else:
        out = [{"index": i, "text": t, "finish_reason": f, "logprobs": _logprobs_json(lp, tokenizer, chat=False)}
               for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs))]
    return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": out,
                         "usage": _usage(prompt_tokens, completion_tokens, stats[0].cached_tokens),
                         "tachy": {"stats": [_stats_json(s) for s in stats]}})


async def _stream(reader: _Reader, first: tuple, meta: dict, chat: bool, choices: int, prompt_tokens: int,
                  include_usage: bool, tokenizer, echo: list[str] | None = None,
                  tools: ToolPlan | None = None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. An answer that may be a tool
    call is held back until it is known (then one ``delta.tool_calls`` chunk), see server/tools.py."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_field = {"usage": None} if include_usage else {}
    offsets = [len(e) for e in echo] if echo else [0] * choices   # completions' text_offset, per choice

    def chunk(index: int, text: str | None, finish: str | None, extra: dict | None = None,
              role: bool = False, logprobs: list | None = None) -> str:
        lp = _logprobs_json(logprobs, tokenizer, chat, offsets[index])
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
        data = {**meta, "object": obj, "choices": [choice], **usage_field, **(extra or {})}
        return f"data: {json.dumps(data)}\n\n"

    completion_tokens = [0] * choices
    cached_tokens = 0
    started = [False] * choices
    held: list[str | None] = [""] * choices if tools is not None and tools.active else [None] * choices
    held_logprobs: list[list] = [[] for _ in range(choices)]
    try:
        async for kind, index, payload in _pieces(reader, first):
            if kind == "error":
                yield f"data: {json.dumps(_stream_error(payload))}\n\n"
                continue
            piece: GenerationResponse = payload
            if not started[index]:
                started[index] = True
                if chat:
                    yield chunk(index, None, None, role=True)
                elif echo:
                    yield chunk(index, echo[index], None)
            completion_tokens[index] = piece.stats.generated_tokens
            cached_tokens = max(cached_tokens, piece.stats.cached_tokens)
            if held[index] is not None:   # maybe a tool call: hold the text until that is decided
                held[index] += piece.text
                held_logprobs[index] += piece.logprobs or []
                calls = tools.parse(held[index]) if piece.finish_reason is not None else None
                if calls is not None:
                    delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                    data = {**meta, "object": obj, **usage_field, "choices": [
                        {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}]}
                    yield f"data: {json.dumps(data)}\n\n"
                    yield chunk(index, None, "tool_calls")
                    continue
                if tools.maybe_call(held[index]) and piece.finish_reason is None:
                    continue
                piece = dataclasses.replace(   # a text answer after all: release it
                    piece, text=held[index], logprobs=held_logprobs[index] if piece.logprobs is not None else None)
                held[index] = None
            if piece.text or piece.token_ids:
                yield chunk(index, piece.text, None, {"tachy": _piece_json(piece, tokenizer)},
                            logprobs=piece.logprobs)
                offsets[index] += len(piece.text)
            if piece.finish_reason is not None:
                yield chunk(index, None if chat else "", piece.finish_reason)
        if include_usage and not reader.job.cancelled.is_set():
            usage = _usage(prompt_tokens, sum(completion_tokens), cached_tokens)
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        reader.close()  # a client gone mid-stream lands here too: the worker drops the job at its next step


def _logprobs_json(logprobs: list | None, tokenizer, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's logprobs object for some generated tokens: chat's ``{"content": [{token, logprob, bytes,
    top_logprobs}]}``, or completions' ``{tokens, token_logprobs, top_logprobs, text_offset}``."""
    if logprobs is None:
        return None
    text = lambda t: tokenizer.decode([t])   # noqa: E731

    def entry(token: int, logprob: float) -> dict:
        s = text(token)
        return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode("utf-8", "backslashreplace"))}

    if chat:
        return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                            for x in logprobs]}
    tokens = [text(x.token) for x in logprobs]
    starts = []
    for s in tokens:
        starts.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [_finite(x.logprob) for x in logprobs],
            "top_logprobs": [{text(t): _finite(lp) for t, lp in x.top} for x in logprobs], "text_offset": starts}


MIN_LOGPROB = -9999.0   # what vLLM and OpenAI report for a token of probability 0


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry: a token that a response_format rules out has -inf, which no JSON
    encoder writes (the whole answer was a 500)."""
    return max(logprob, MIN_LOGPROB)


def _stream_error(exc: Exception) -> dict:
    """The error chunk of a stream that already started (its HTTP status was 200)."""
    if isinstance(exc, TachyError):
        return error_body(str(exc), "invalid_request_error")
    if isinstance(exc, ShuttingDown):
        return error_body(str(exc), "server_error", code="shutting_down")
    return error_body("internal error", "server_error")


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose K/V the prefix cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _stats_json(s: GenerationStats) -> dict:
    return {"tokens_per_s": round(s.tokens_per_s, 2), "mean_accepted": round(s.mean_accepted, 3),
            "generated_tokens": s.generated_tokens, "forwards": s.forwards, "drafted": s.drafted,
            "accepted": s.accepted, "prefill_s": round(s.prefill_s, 4), "decode_s": round(s.decode_s, 4),
            "kv_bytes": s.kv_bytes, "kv_full_bytes": s.kv_full_bytes}


def _piece_json(piece: GenerationResponse, tokenizer) -> dict:
    """The tachy extension of a stream chunk: which tokens were drafted, and the text of each where the piece
    splits exactly into its tokens (so a page can shade every token; else the piece is one segment)."""
    texts = [tokenizer.decode([t]) for t in piece.token_ids]
    if "".join(texts) == piece.text:
        segments = [[t, d] for t, d in zip(texts, piece.from_draft)]
    else:
        segments = [[piece.text, bool(piece.from_draft) and all(piece.from_draft)]]
    return {"from_draft": piece.from_draft, "segments": segments, **_stats_json(piece.stats)}
