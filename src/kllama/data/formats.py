"""Row converters: every supported layout becomes one canonical example.

Canonical preference example: `{"system": str, "prompt": [msg, ...], "chosen": str, "rejected": str}` where the
prompt alternates user/assistant and ends on a user (or observation) turn. Canonical SFT example:
`{"system": str, "messages": [msg, ...]}` alternating and ending on an assistant (or function) turn. A converter
raises `RowProblem` with a sentence naming what is wrong; the loader adds the file and row.
"""
from __future__ import annotations

from collections.abc import Callable

from kllama.data.registry import DatasetEntry
from kllama.data.templates import PROMPT_ROLES, RESPONSE_ROLES


class RowProblem(ValueError):
    """One row cannot be used; the message says why."""


def _text(value, what: str, *, required: bool = True) -> str:
    if value is None or value == "":
        if required:
            raise RowProblem(f"{what} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"{what} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem(f"{what} is blank")
    return value


def _col(row: dict, entry: DatasetEntry, key: str):
    name = entry.columns.get(key)
    return row.get(name) if name else None


def check_alternation(messages: list[dict], *, end: str) -> None:
    """Roles must go user, assistant, user, ...; `end` is "prompt" (ends on a user turn) or "response"."""
    if not messages:
        raise RowProblem("the conversation is empty")
    for i, m in enumerate(messages):
        expected = PROMPT_ROLES if i % 2 == 0 else RESPONSE_ROLES
        if m["role"] not in expected:
            want = "a user" if i % 2 == 0 else "an assistant"
            raise RowProblem(f"roles must alternate user/assistant: message {i} is {m['role']!r} where {want} turn belongs")
        _text(m["content"], f"message {i} content")
    last_is_prompt = len(messages) % 2 == 1
    if end == "prompt" and not last_is_prompt:
        raise RowProblem("the conversation must end with a user turn (chosen/rejected are the answers to it)")
    if end == "response" and last_is_prompt:
        raise RowProblem("the conversation must end with an assistant turn")


def _tag_messages(raw, entry: DatasetEntry, what: str) -> tuple[list[dict], str]:
    """Tagged message dicts (from/value or role/content) -> canonical messages, plus a leading system prompt."""
    if not isinstance(raw, list):
        raise RowProblem(f"{what} must be a list of messages, got {type(raw).__name__}")
    t = entry.tags
    roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["observation_tag"]: "observation",
             t["function_tag"]: "function", t["system_tag"]: "system"}
    out, system = [], ""
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowProblem(f"{what}[{i}] must be an object with {t['role_tag']!r}/{t['content_tag']!r}, got {type(m).__name__}")
        tag = m.get(t["role_tag"])
        if tag not in roles:
            raise RowProblem(f"{what}[{i}] has role {tag!r}; expected one of {sorted(r for r in roles if r)}")
        content = m.get(t["content_tag"])
        if roles[tag] == "system":
            if i != 0:
                raise RowProblem(f"{what}[{i}] is a system message; only the first message may be one")
            system = _text(content, f"{what}[0] (system) content", required=False)
            continue
        if not isinstance(content, str):
            raise RowProblem(f"{what}[{i}] content must be a string, got {type(content).__name__}")
        out.append({"role": roles[tag], "content": content})
    return out, system


def _answer(value, entry: DatasetEntry, what: str) -> str:
    """chosen/rejected: a message object (assistant role), a one-message list, or a plain string."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        msgs, _ = _tag_messages([value], entry, what)
        if msgs[0]["role"] not in RESPONSE_ROLES:
            raise RowProblem(f"{what} must be an assistant message, got role {msgs[0]['role']!r}")
        value = msgs[0]["content"]
    elif value is not None and not isinstance(value, str):
        raise RowProblem(f"{what} must be a message object or a string, got {type(value).__name__}")
    return _text(value, what)


def _system(row: dict, entry: DatasetEntry, inline: str = "") -> str:
    return inline or _text(_col(row, entry, "system"), "system", required=False)


def _no_tools(row: dict, entry: DatasetEntry) -> None:
    if _col(row, entry, "tools"):
        raise RowProblem("tool definitions (the tools column) are not supported yet; drop the column from `columns`")


# ---- alpaca -------------------------------------------------------------------------------------------------

def _alpaca_prompt(row: dict, entry: DatasetEntry) -> list[dict]:
    parts = [_text(_col(row, entry, "prompt"), f"{entry.columns['prompt']!r} (instruction)")]
    query = _text(_col(row, entry, "query"), "input", required=False)
    if query:
        parts.append(query)
    messages = []
    history = _col(row, entry, "history") or []
    if not isinstance(history, list):
        raise RowProblem(f"history must be a list of [instruction, answer] pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RowProblem(f"history[{i}] must be an [instruction, answer] pair")
        messages += [{"role": "user", "content": _text(turn[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(turn[1], f"history[{i}][1]")}]
    return messages + [{"role": "user", "content": "\n".join(parts)}]


def alpaca_pair(row: dict, entry: DatasetEntry) -> dict:
    prompt = _alpaca_prompt(row, entry)
    return {"system": _system(row, entry), "prompt": prompt,
            "chosen": _text(_col(row, entry, "chosen"), "chosen"), "rejected": _text(_col(row, entry, "rejected"), "rejected")}


def alpaca_sft(row: dict, entry: DatasetEntry) -> dict:
    messages = _alpaca_prompt(row, entry) + [
        {"role": "assistant", "content": _text(_col(row, entry, "response"), f"{entry.columns['response']!r} (output)")}
    ]
    return {"system": _system(row, entry), "messages": messages}


# ---- sharegpt / openai ----------------------------------------------------------------------------------------

def sharegpt_pair(row: dict, entry: DatasetEntry) -> dict:
    _no_tools(row, entry)
    prompt, inline_system = _tag_messages(_col(row, entry, "messages"), entry, entry.columns["messages"])
    check_alternation(prompt, end="prompt")
    return {"system": _system(row, entry, inline_system), "prompt": prompt,
            "chosen": _answer(_col(row, entry, "chosen"), entry, "chosen"),
            "rejected": _answer(_col(row, entry, "rejected"), entry, "rejected")}


def sharegpt_sft(row: dict, entry: DatasetEntry) -> dict:
    _no_tools(row, entry)
    messages, inline_system = _tag_messages(_col(row, entry, "messages"), entry, entry.columns["messages"])
    check_alternation(messages, end="response")
    return {"system": _system(row, entry, inline_system), "messages": messages}


# ---- TRL preference style ------------------------------------------------------------------------------------

def trl_pair(row: dict, entry: DatasetEntry) -> dict:
    """prompt: string or message list; chosen/rejected: string, one assistant message, or (without a prompt
    column) whole conversations that share every message but the last."""
    raw_prompt, chosen, rejected = _col(row, entry, "prompt"), _col(row, entry, "chosen"), _col(row, entry, "rejected")
    system = ""
    if raw_prompt is None and isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1:
        c_msgs, system = _tag_messages(chosen, entry, "chosen")
        r_msgs, _ = _tag_messages(rejected, entry, "rejected")
        if c_msgs[:-1] != r_msgs[:-1]:
            raise RowProblem("chosen and rejected conversations must share every message but the last")
        prompt, chosen, rejected = c_msgs[:-1], c_msgs[-1:], r_msgs[-1:]
        chosen = [{entry.tags["role_tag"]: entry.tags["assistant_tag"], entry.tags["content_tag"]: chosen[0]["content"]}]
        rejected = [{entry.tags["role_tag"]: entry.tags["assistant_tag"], entry.tags["content_tag"]: rejected[0]["content"]}]
    elif isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": _text(raw_prompt, "prompt")}]
    else:
        prompt, system = _tag_messages(raw_prompt, entry, "prompt") if raw_prompt is not None else ([], "")
    check_alternation(prompt, end="prompt")
    return {"system": _system(row, entry, system), "prompt": prompt,
            "chosen": _answer(chosen, entry, "chosen"), "rejected": _answer(rejected, entry, "rejected")}


# (formatting, stage) -> converter. Stage "dpo" needs a ranking dataset, "sft" a plain one.
CONVERTERS: dict[tuple[str, str], Callable[[dict, DatasetEntry], dict]] = {
    ("alpaca", "dpo"): alpaca_pair,
    ("alpaca", "sft"): alpaca_sft,
    ("sharegpt", "dpo"): sharegpt_pair,
    ("sharegpt", "sft"): sharegpt_sft,
    ("openai", "dpo"): sharegpt_pair,
    ("openai", "sft"): sharegpt_sft,
    ("trl", "dpo"): trl_pair,
    ("trl", "sft"): sharegpt_sft,  # TRL's conversational SFT layout is a `messages` list
}

# Columns each (formatting, stage) cannot do without.
REQUIRED_COLUMNS: dict[tuple[str, str], tuple[str, ...]] = {
    ("alpaca", "dpo"): ("prompt", "chosen", "rejected"),
    ("alpaca", "sft"): ("prompt", "response"),
    ("sharegpt", "dpo"): ("messages", "chosen", "rejected"),
    ("sharegpt", "sft"): ("messages",),
    ("openai", "dpo"): ("messages", "chosen", "rejected"),
    ("openai", "sft"): ("messages",),
    ("trl", "dpo"): ("chosen", "rejected"),
    ("trl", "sft"): ("messages",),
}
