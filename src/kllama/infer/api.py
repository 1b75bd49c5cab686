"""`kllama api`: an OpenAI-compatible chat completions server (FastAPI + uvicorn, SSE streaming).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (plain or `stream: true`). Requests join one running
decode batch (`Scheduler`); a client that disconnects stops its answer at the next token. Errors use OpenAI's
`{"error": {"message", "type", "param", "code"}}` shape (`api_errors`); settings come from API_* environment
variables (`api_settings`), as in LLaMA-Factory.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from kllama.config.loader import KllamaConfig
from kllama.infer.api_errors import ApiError, BodyLimit, error_for, install_error_handlers
from kllama.infer.api_schemas import (
    ROLES,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    completion_id,
)
from kllama.infer.api_settings import ApiSettings, bearer_matches, log_auth_state
from kllama.infer.api_worker import Submission
from kllama.infer.engine import FINISH_STOP, GenerationEngine, build_engine
from kllama.infer.sampling import SamplingParams
from kllama.infer.scheduler import QueueFullError, Scheduler

logger = logging.getLogger(__name__)

SYSTEM_ROLES = ("system", "developer")


def _check_text(text: str, param: str) -> str:
    # A lone surrogate ("\ud800") parses from JSON but is no Unicode text: the tokenizer cannot take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param}: holds invalid Unicode (a lone surrogate at character {exc.start}); send valid "
                       "UTF-8 text", param, "invalid_unicode") from None
    return text


def _content_text(message: ChatMessage, index: int) -> str:
    param = f"messages[{index}].content"
    if message.content is None or isinstance(message.content, str):
        return _check_text(message.content or "", param)
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{param}: only text parts are supported, got a {part.type!r} part", param)
        texts.append(_check_text(part.text, param))
    return "".join(texts)


def conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str | None]:
    """Check a request's messages and split them into (turns, system prompt): an optional system (or developer)
    message first, then user and assistant turns alternating, starting and ending with the user."""
    if not messages:
        raise ApiError(400, "messages: must contain at least one message", "messages")
    system = None
    turns = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role: unknown role {message.role[:40]!r}; use one of "
                           f"{', '.join(ROLES)}", f"messages[{i}].role")
        text = _content_text(message, i)
        if message.role in SYSTEM_ROLES:
            if i != 0:
                raise ApiError(400, f"messages[{i}]: a {message.role} message is only allowed first",
                               f"messages[{i}].role")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(400, f"messages[{i}].role: roles must alternate user/assistant starting with user; "
                           f"expected {expected!r}, got {message.role!r}", f"messages[{i}].role")
        turns.append({"role": message.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be from the user", "messages")
    return turns, system


def sampling_for(req: ChatCompletionRequest, defaults: SamplingParams, prompt_len: int, context: int) -> SamplingParams:
    """The request's sampling settings over the config's defaults, with the token budget checked against the context."""
    if prompt_len >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but the messages take "
                       f"{prompt_len} tokens. Shorten the messages.", "messages", "context_length_exceeded")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if requested is not None and requested < 1:
        raise ApiError(400, f"{param}: must be at least 1, got {requested}", param)
    if requested is not None and prompt_len + requested > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the messages take {prompt_len} "
                       f"and {param} asks for {requested} more. Lower {param} or shorten the messages.", param,
                       "context_length_exceeded")
    budget = requested if requested is not None else min(defaults.max_new_tokens, context - prompt_len)
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and len(stop) > 4:
        raise ApiError(400, f"stop: at most 4 stop sequences, got {len(stop)}", "stop")
    for text in stop or ():
        _check_text(text, "stop")
    do_sample = defaults.do_sample if req.temperature is None else req.temperature > 0
    return defaults.updated(
        max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        repetition_penalty=req.repetition_penalty, do_sample=do_sample, seed=req.seed,
        stop=tuple(stop) if stop is not None else None, ignore_eos=req.ignore_eos,
    )


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The settings of each of `n` choices: each draws its own sample; a seeded request stays reproducible choice
    by choice (seed + index, wrapping within the seed range)."""
    if params.seed is None:
        return [params] * n
    return [params.updated(seed=(params.seed + i) % 2**64) if i else params for i in range(n)]


def create_app(engine: GenerationEngine, model_id: str, settings: ApiSettings | None = None,
               default_system: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_id` with `settings` (Bearer `api_key` when set)."""
    settings = settings or ApiSettings()
    # The engine's cache has a slot per sequence decoded together: the batch cannot be larger.
    scheduler = Scheduler(engine, max_batch=min(settings.max_batch, engine.max_batch), max_queue=settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="kllama", description="OpenAI-compatible API of a kllama model", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.scheduler = scheduler

    def check_auth(request: Request) -> None:
        if settings.api_key and not bearer_matches(request.headers.get("authorization", ""), settings.api_key):
            raise ApiError(401, "Incorrect or missing API key; send the header `Authorization: Bearer <API_KEY>`",
                           None, "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "waiting": scheduler.waiting, "running": scheduler.running,
                "batch_limit": scheduler.max_batch, "queue_limit": scheduler.max_queue, **engine.stats,
                "graph_captures": engine.decoder.captures, "capture_s": round(engine.decoder.capture_s, 3)}

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id)])

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)], response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> ChatCompletion | EventSourceResponse:
        if req.model != model_id:
            _check_text(req.model, "model")
            raise ApiError(404, f"The model {req.model[:80]!r} does not exist; this server serves {model_id!r}",
                           "model", "model_not_found")
        turns, system = conversation(req.messages)
        # Rendering and tokenizing a long conversation takes a while: keep the event loop (and /health) free.
        prompt_ids = await run_in_threadpool(engine.encode, turns, system if system is not None else default_system)
        params = sampling_for(req, engine.defaults, len(prompt_ids), engine.context_length)
        try:
            submission = Submission(scheduler, engine, prompt_ids, choice_params(params, req.n))
        except QueueFullError:
            raise ApiError(429, f"The server is busy: its queue holds {scheduler.max_queue} waiting sequences "
                           "(API_MAX_QUEUE); retry shortly.", None, "rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # The background task also covers a client gone before the stream's generator ever ran.
            return EventSourceResponse(_stream(submission, req, model_id, len(prompt_ids), include_usage), ping=600,
                                       background=BackgroundTask(submission.cancel.set))
        return await _complete(submission, request, req, model_id, len(prompt_ids))

    return app


async def _complete(submission: Submission, request: Request, req: ChatCompletionRequest, model_id: str,
                    prompt_len: int) -> ChatCompletion:
    watcher = asyncio.create_task(submission.cancel_on_disconnect(request))
    parts: list[list[str]] = [[] for _ in range(req.n)]
    finish, produced = [FINISH_STOP] * req.n, 0
    try:
        async for index, chunk in submission.items():
            parts[index].append(chunk.text)
            if chunk.finish_reason is not None:
                finish[index], produced = chunk.finish_reason, produced + chunk.completion_tokens
    finally:
        watcher.cancel()
    choices = [Choice(index=i, message=ResponseMessage(content="".join(parts[i])), finish_reason=finish[i])
               for i in range(req.n)]
    usage = Usage(prompt_tokens=prompt_len, completion_tokens=produced, total_tokens=prompt_len + produced)
    return ChatCompletion(id=completion_id(), model=model_id, choices=choices, usage=usage)


async def _stream(submission: Submission, req: ChatCompletionRequest, model_id: str, prompt_len: int,
                  include_usage: bool) -> AsyncIterator[str]:
    cid, produced = completion_id(), 0

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=cid, model=model_id, choices=choices, usage=usage)
        return body.model_dump_json(exclude_none=False)

    started: set[int] = set()
    try:
        async for index, piece in submission.items():
            if index not in started:
                started.add(index)
                yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
            if piece.text:
                yield chunk([ChunkChoice(index=index, delta=Delta(content=piece.text))])
            if piece.finish_reason is not None:
                produced += piece.completion_tokens
                yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=piece.finish_reason)])
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in OpenAI's in-stream error shape
        status, body = error_for(exc)
        if status == 500:
            logger.exception("streamed answer failed")
        yield json.dumps(body, ensure_ascii=True)
        return
    if include_usage:
        usage = Usage(prompt_tokens=prompt_len, completion_tokens=produced, total_tokens=prompt_len + produced)
        yield chunk([], usage)
    yield "[DONE]"


def run_api(config: KllamaConfig) -> int:
    """Entry point of `kllama api`: load the model per the config and serve it until interrupted."""
    import uvicorn

    settings = ApiSettings.from_env()
    engine = build_engine(config, max_batch=settings.max_batch)
    engine.prefill_tokens = settings.prefill_chunk
    model_id = settings.model_name or engine.loaded.model_id
    app = create_app(engine, model_id, settings, config.data.default_system)
    log_auth_state(settings)
    print(f"kllama api: KV cache {engine.kv_cache_bytes / 2**30:.2f} GiB on {engine.loaded.device}: "
          f"{engine.max_batch} sequences (API_MAX_BATCH) x {engine.context_length} tokens (kt_maxlen); decode steps "
          + (f"replayed as CUDA graphs ({engine.decoder.captures} captured in {engine.capture_s:.1f} s)"
             if engine.decoder.graphed else f"eager: {engine.decoder.reason}")
          + (f"; {engine.compile_note}" if engine.compile_note else "")
          + (f"; warm-up prefill + decode step {engine.warmup_s:.1f} s" if engine.warmup_s is not None else ""),
          flush=True)
    print(f"kllama api: serving {model_id!r} on http://{settings.host}:{settings.port}/v1 (docs at /docs); batches of "
          f"up to {settings.max_batch}, queue {settings.max_queue}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


__all__ = ["create_app", "run_api", "conversation", "sampling_for", "ApiError"]
