"""What `kllama api` reads from its environment (LLaMA-Factory's API_* variables plus kllama's limits), and the
Bearer-key check.

| variable | default | meaning |
|---|---|---|
| API_HOST | 127.0.0.1 | address to listen on |
| API_PORT | 8000 | port |
| API_KEY | (none) | require `Authorization: Bearer <key>`; unset or empty = no authentication (logged) |
| API_MODEL_NAME | model dir (+adapter) | the model id clients send |
| API_LOG_LEVEL | warning | uvicorn's log level |
| API_MAX_BATCH | 32 | sequences decoded together in one running batch |
| API_MAX_QUEUE | 256 | sequences waiting behind the batch; more get 429 |
| API_MAX_BODY_BYTES | 1048576 | largest request body; larger ones get 413 |
| API_PREFILL_CHUNK | 2048 | prompt tokens read per step (newcomers are read in chunks, together, between answer tokens) |
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

from kllama.errors import KllamaError

logger = logging.getLogger(__name__)


def _int_env(name: str, default: int, low: int, high: int | None = None) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.lstrip("-").isdigit() or int(text) < low or (high is not None and int(text) > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise KllamaError(f"{name}={text!r} is not valid; set it to an integer {bound} (or unset it for {default})")
    return int(text)


@dataclass(frozen=True)
class ApiSettings:
    """The server's settings (see the module docstring for each variable)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    log_level: str = "warning"
    max_batch: int = 32
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    prefill_chunk: int = 2048

    @classmethod
    def from_env(cls) -> "ApiSettings":
        """Settings from the API_* environment variables; a malformed value raises KllamaError naming it."""
        return cls(
            host=os.environ.get("API_HOST", "").strip() or cls.host,
            port=_int_env("API_PORT", cls.port, 1, 65535),
            api_key=os.environ.get("API_KEY") or None,
            model_name=os.environ.get("API_MODEL_NAME") or None,
            log_level=os.environ.get("API_LOG_LEVEL", "").strip() or cls.log_level,
            max_batch=_int_env("API_MAX_BATCH", cls.max_batch, 1),
            max_queue=_int_env("API_MAX_QUEUE", cls.max_queue, 0),
            max_body_bytes=_int_env("API_MAX_BODY_BYTES", cls.max_body_bytes, 1024),
            prefill_chunk=_int_env("API_PREFILL_CHUNK", cls.prefill_chunk, 1),
        )


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from elsewhere


def log_auth_state(settings: ApiSettings) -> list[str]:
    """Warn when the server runs without authentication (louder when it listens beyond loopback); returns the
    warnings."""
    if settings.api_key:
        return []
    why = "API_KEY is empty" if "API_KEY" in os.environ else "API_KEY is not set"
    warnings = [f"{why}: authentication is off, every request is served"]
    if not is_loopback(settings.host):
        warnings.append(f"API_HOST={settings.host} is not a loopback address and no API_KEY is set: anyone who can "
                        f"reach port {settings.port} of this machine can use the model; set API_KEY or listen on "
                        "127.0.0.1")
    for message in warnings:
        logger.warning(message)
    return warnings


def bearer_matches(authorization: str, api_key: str) -> bool:
    """True when the Authorization header carries `api_key` with the Bearer scheme (any case, RFC 7235), compared
    in constant time."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Starlette decodes headers as latin-1: encoding back gives the bytes the client sent.
    return hmac.compare_digest(token.strip().encode("latin-1"), api_key.encode("utf-8"))
