"""`kllama api`: an OpenAI-compatible chat completions server (FastAPI + uvicorn, SSE streaming).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (plain or `stream: true`). Errors use OpenAI's
`{"error": {"message", "type", "param", "code"}}` shape with the matching status. API_HOST, API_PORT, API_KEY
(Bearer auth when set) and API_MODEL_NAME come from the environment, as in LLaMA-Factory.
"""
from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
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
from kllama.infer.api_worker import GenerationWorker, generate_async
from kllama.infer.engine import FINISH_STOP, GenerationEngine, build_engine
from kllama.infer.sampling import SamplingParams

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error type
ERROR_TYPES: dict[int, str] = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                               405: "invalid_request_error", 500: "server_error"}


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body with `status`."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _content_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}].content: only text parts are supported, got a {part.type!r} part",
                           f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str | None]:
    """Check a request's messages and split them into (turns, system prompt): an optional system message first,
    then user and assistant turns alternating, starting and ending with the user."""
    if not messages:
        raise ApiError(400, "messages: must contain at least one message", "messages")
    system = None
    turns = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role: unknown role {message.role!r}; use one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        text = _content_text(message, i)
        if message.role == "system":
            if i != 0:
                raise ApiError(400, f"messages[{i}]: a system message is only allowed first", f"messages[{i}].role")
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
    do_sample = defaults.do_sample if req.temperature is None else req.temperature > 0
    return defaults.updated(
        max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        repetition_penalty=req.repetition_penalty, do_sample=do_sample, seed=req.seed,
        stop=tuple(stop) if stop is not None else None, ignore_eos=req.ignore_eos,
    )


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    # Each of the n choices draws its own sample; a seeded request stays reproducible choice by choice.
    return params if params.seed is None else params.updated(seed=params.seed + index)


def create_app(engine: GenerationEngine, model_id: str, api_key: str | None = None,
               default_system: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_id`; Bearer `api_key` is required when given."""
    app = FastAPI(title="kllama", description="OpenAI-compatible API of a kllama model")
    worker = GenerationWorker(engine)
    app.state.worker = worker

    def check_auth(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "Incorrect or missing API key; send the header `Authorization: Bearer <API_KEY>`",
                           None, "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON; send a JSON object.", None, "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(KllamaError)
    async def _kllama_error(request: Request, exc: KllamaError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "waiting": worker.waiting, **engine.stats}

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id)])

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)], response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> ChatCompletion | EventSourceResponse:
        if req.model != model_id:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}",
                           "model", "model_not_found")
        turns, system = conversation(req.messages)
        prompt_ids = engine.encode(turns, system if system is not None else default_system)
        params = sampling_for(req, engine.defaults, len(prompt_ids), engine.context_length)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_stream(worker, req, model_id, prompt_ids, params, include_usage), ping=600)
        return await _complete(worker, req, model_id, prompt_ids, params)

    return app


async def _complete(worker: GenerationWorker, req: ChatCompletionRequest, model_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> ChatCompletion:
    choices, produced = [], 0
    for index in range(req.n):
        parts, finish = [], FINISH_STOP
        async for chunk in generate_async(worker, prompt_ids, _choice_params(params, index)):
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                finish, produced = chunk.finish_reason, produced + chunk.completion_tokens
        choices.append(Choice(index=index, message=ResponseMessage(content="".join(parts)), finish_reason=finish))
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=produced, total_tokens=len(prompt_ids) + produced)
    return ChatCompletion(id=completion_id(), model=model_id, choices=choices, usage=usage)


async def _stream(worker: GenerationWorker, req: ChatCompletionRequest, model_id: str, prompt_ids: list[int],
                  params: SamplingParams, include_usage: bool) -> AsyncIterator[str]:
    cid, produced = completion_id(), 0

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=cid, model=model_id, choices=choices, usage=usage)
        return body.model_dump_json(exclude_none=False)

    for index in range(req.n):
        yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        async for piece in generate_async(worker, prompt_ids, _choice_params(params, index)):
            if piece.text:
                yield chunk([ChunkChoice(index=index, delta=Delta(content=piece.text))])
            if piece.finish_reason is not None:
                produced += piece.completion_tokens
                yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=piece.finish_reason)])
    if include_usage:
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=produced, total_tokens=len(prompt_ids) + produced)
        yield chunk([], usage)
    yield "[DONE]"


def server_address() -> tuple[str, int]:
    """(host, port) from API_HOST (default 127.0.0.1) and API_PORT (default 8000)."""
    host = os.environ.get("API_HOST", "127.0.0.1")
    port_text = os.environ.get("API_PORT", "8000")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise KllamaError(f"API_PORT={port_text!r} is not a port number; set it to an integer in 1..65535")
    return host, int(port_text)


def run_api(config: KllamaConfig) -> int:
    """Entry point of `kllama api`: load the model per the config and serve it until interrupted."""
    import uvicorn

    host, port = server_address()
    engine = build_engine(config)
    model_id = os.environ.get("API_MODEL_NAME") or engine.loaded.model_id
    app = create_app(engine, model_id, os.environ.get("API_KEY") or None, config.data.default_system)
    print(f"kllama api: serving {model_id!r} on http://{host}:{port}/v1 (docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("API_LOG_LEVEL", "warning"))
    return 0


__all__ = ["create_app", "run_api", "conversation", "sampling_for", "ApiError"]
