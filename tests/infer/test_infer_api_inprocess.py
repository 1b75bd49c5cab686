"""The API app served by uvicorn on loopback inside the test process, for what needs a particular app: tight
limits (429, 413), an internal failure (500 without its text, keep-alive kept), a model producing NaN logits."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from kllama.infer.api import create_app
from kllama.infer.api_settings import ApiSettings
from kllama.infer.engine import GenerationEngine

MESSAGES = [{"role": "user", "content": "What is a mixture of experts?"}]


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL; stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def _wait_for(base: str, what: str, ok: Callable[[dict], bool], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not ok(health := httpx.get(f"{base}/health", timeout=10).json()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {health}"
        time.sleep(0.05)
    return health


def test_full_queue_answers_429_and_large_bodies_413(engine: GenerationEngine) -> None:
    app = create_app(engine, "tiny", ApiSettings(max_batch=1, max_queue=1, max_body_bytes=4096))
    with serving(app) as base:
        stop = threading.Event()
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1500, "stream": True, "ignore_eos": True}

        def read() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=read, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            _wait_for(base, "one running, one waiting", lambda h: h["running"] == 1 and h["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as err:
                _client(base).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["code"] == "rate_limit_exceeded"
            assert err.value.response.headers["retry-after"] == "1"
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        _wait_for(base, "an empty queue", lambda h: h["running"] == 0 and h["waiting"] == 0)
        assert _client(base).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices

        big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        headers = {"Content-Type": "application/json"}
        declared = httpx.post(f"{base}/v1/chat/completions", content=big, headers=headers, timeout=30)
        chunked = httpx.post(f"{base}/v1/chat/completions", content=iter([big[:3000], big[3000:]]), headers=headers,
                             timeout=30)
        for raw in (declared, chunked):
            assert raw.status_code == 413 and raw.json()["error"]["code"] == "request_too_large", raw.text


def test_internal_failure_is_a_500_without_details_and_the_connection_survives(engine: GenerationEngine) -> None:
    app = create_app(engine, "tiny")

    @app.get("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("secret-internal-detail")

    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(2):
            raw = client.get("/v1/boom")
            assert raw.status_code == 500 and raw.json()["error"]["type"] == "server_error"
            assert "secret-internal-detail" not in raw.text and "RuntimeError" not in raw.text
            ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
            assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def nan_engine(tiny_model_dir: Callable[..., Path]) -> GenerationEngine:
    """A model whose logits hold NaN (one lm_head row of NaN), as a broken adapter would make them."""
    from kllama.config.loader import build_config
    from kllama.infer.engine import build_engine

    config = build_config({"model_name_or_path": str(tiny_model_dir("qwen3_moe")), "template": "empty",
                           "infer_dtype": "float32"}, command="chat")
    engine = build_engine(config, device="cpu")
    with torch.no_grad():
        engine.loaded.model.lm_head.weight[3].fill_(float("nan"))
    return engine


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_nan_logits_answer_400_plain_and_an_error_event_streamed(nan_engine: GenerationEngine,
                                                                  temperature: float) -> None:
    app = create_app(nan_engine, "broken")
    kw = dict(model="broken", messages=MESSAGES, max_tokens=4, temperature=temperature)
    with serving(app) as base:
        client = _client(base)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**kw)
        assert err.value.body["code"] == "non_finite_logits" and "NaN" in err.value.body["message"]
        with pytest.raises(openai.APIError) as streamed:
            list(client.chat.completions.create(**kw, stream=True))
        assert "NaN" in streamed.value.message
        assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"


def test_missing_authentication_is_logged_and_settings_are_checked(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from kllama.errors import KllamaError
    from kllama.infer.api_settings import log_auth_state

    monkeypatch.setenv("API_KEY", "")
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="kllama.infer.api_settings"):
        warnings = log_auth_state(ApiSettings.from_env())
    assert len(warnings) == 2 and "API_KEY is empty: authentication is off" in warnings[0]
    assert "API_HOST=0.0.0.0" in warnings[1] and "anyone who can reach port 8000" in warnings[1]
    assert [r.getMessage() for r in caplog.records] == warnings
    monkeypatch.setenv("API_HOST", "::1")
    assert len(log_auth_state(ApiSettings.from_env())) == 1
    monkeypatch.setenv("API_KEY", "k")
    assert log_auth_state(ApiSettings.from_env()) == []
    monkeypatch.setenv("API_MAX_QUEUE", "lots")
    with pytest.raises(KllamaError, match="API_MAX_QUEUE='lots'"):
        ApiSettings.from_env()
