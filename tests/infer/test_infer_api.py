"""`kllama api` as a real subprocess on loopback, driven with the official `openai` client (and raw httpx)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from kllama.infer.sampling import SamplingParams

API_KEY = "test-key-123"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a mixture of experts?"}]


@dataclass
class Server:
    base: str
    model_id: str
    proc: subprocess.Popen
    log: Path

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=10).json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(moe_model: Path, moe_adapter: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    port = _free_port()
    log = tmp_path_factory.mktemp("api") / "server.log"
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_KEY": API_KEY}
    args = [sys.executable, "-m", "kllama.cli", "api", f"model_name_or_path={moe_model}",
            f"adapter_name_or_path={moe_adapter}", "template=deepseek", "infer_dtype=float32", "max_new_tokens=16"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not come up:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield Server(base, f"{moe_model.name}+{moe_adapter.name}", proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_list_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [server.model_id]
    assert server.health()["status"] == "ok"


def test_completion_matches_the_engine_and_stream_matches_completion(server: Server, engine) -> None:  # noqa: ANN001
    client = server.client()
    kw = dict(model=server.model_id, messages=MESSAGES, temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kw)
    prompt = engine.encode(MESSAGES[1:], "Be brief.")
    expected = engine.complete(prompt, SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True))
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 10)
    assert reply.usage.total_tokens == len(prompt) + 10

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_choices_stop_and_max_completion_tokens(server: Server) -> None:
    client = server.client()
    base = dict(model=server.model_id, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**base, n=2, max_completion_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy: identical
    assert reply.usage.completion_tokens == 12
    full = reply.choices[0].message.content
    stop = full[3:6]
    cut = client.chat.completions.create(**base, max_tokens=6, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_auth_is_required(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        server.client(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    raw = httpx.post(f"{server.base}/v1/chat/completions", json={"model": server.model_id, "messages": MESSAGES})
    assert raw.status_code == 401 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


BAD_REQUESTS = {
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "empty messages": ({"messages": []}, "messages"),
    "not alternating": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                        "messages[1].role"),
    "ends with assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                            "messages"),
    "max_tokens zero": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens past context": ({"max_tokens": 100_000}, "max_tokens"),
    "temperature out of range": ({"temperature": 3.5}, "temperature"),
    "prompt longer than context": ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(server: Server, case: str) -> None:
    changes, param = BAD_REQUESTS[case]
    body = {"model": server.model_id, "messages": MESSAGES, **changes}
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_model(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    raw = httpx.post(f"{server.base}/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=headers)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as err:
        server.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"


def test_32_concurrent_streams_complete(server: Server) -> None:
    def one(i: int) -> tuple[str, str]:
        stream = server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": f"Question number {i}?"}],
            max_tokens=3, temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True})
        chunks = [c for c in stream if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    assert [reason for _, reason in results] == ["length"] * 32
    assert server.proc.poll() is None and server.health()["status"] == "ok"


def test_disconnect_stops_generation(server: Server) -> None:
    before = server.health()
    body = {"model": server.model_id, "messages": MESSAGES, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert json.loads(data[0][5:])["object"] == "chat.completion.chunk"
    deadline = time.monotonic() + 30
    while server.health().get("cancelled", 0) <= before.get("cancelled", 0):
        assert time.monotonic() < deadline, "the server kept generating after the client left"
        time.sleep(0.2)
    generated = server.health()["generated_tokens"] - before.get("generated_tokens", 0)
    assert generated < 1500
