"""Chat templates: how a conversation becomes token ids, and which of them are the trained response.

A named template renders each message from a few text *slots* (LLaMA-Factory's model: prefix, system, user,
assistant, observation), encoding every slot string separately with `add_special_tokens=False`, so the ids match
LLaMA-Factory's for the same tokenizer. `auto` renders with the tokenizer's own Jinja `chat_template` and splits
prompt from response by rendering growing prefixes of the conversation.

Messages are `{"role": ..., "content": ...}` with roles user, assistant, observation (tool output) and function
(a tool call, rendered like an assistant turn). A leading `system` message is lifted into the `system` argument.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from kllama.errors import KllamaError

IGNORE_INDEX = -100

# Special slots resolved per tokenizer (a string slot is literal text, "{content}" marks where the message goes).
BOS = ("special", "bos")
EOS = ("special", "eos")
Slot = Any  # str | BOS | EOS
Slots = tuple  # tuple[Slot, ...]

# Roles allowed at even / odd positions of a conversation (after the system prompt).
PROMPT_ROLES = ("user", "observation")
RESPONSE_ROLES = ("assistant", "function")


def truncate_lengths(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's rule for fitting (prompt, response) into `cutoff_len`, favouring the response.

    If the response is under half the budget it keeps everything it has; else if the prompt is under half, the
    response gets what the prompt leaves; else both shrink in proportion. Returns the new (source_len, target_len).
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def split_system(messages: list[dict], system: str | None) -> tuple[list[dict], str | None]:
    """Lift a leading `system` message (OpenAI style) into the system argument; the argument wins if both exist."""
    if messages and messages[0].get("role") == "system":
        return list(messages[1:]), system or messages[0].get("content") or None
    return list(messages), system


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s token ids without special tokens. Quietly past the tokenizer's `model_max_length`: kllama cuts
    every example to `cutoff_len` itself, so transformers' "sequence length is longer than the specified maximum"
    warning (printed on the first long row of a dataset) would only be noise in a clean run."""
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


class Template:
    """What every template offers; subclasses supply `encode_oneturn`, `encode_multiturn` and `stop_token_ids`.

    `encode_oneturn` -> (prompt ids incl. all earlier turns, last response ids); `encode_multiturn` -> a
    (source, target) id pair per user/assistant exchange. Neither truncates.
    """

    name: str

    def encode_oneturn(self, tokenizer, messages: list[dict], system: str | None) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def encode_multiturn(self, tokenizer, messages: list[dict], system: str | None) -> list[tuple[list[int], list[int]]]:
        raise NotImplementedError

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Token ids that end a generated answer (the template's stop words plus the tokenizer's eos)."""
        raise NotImplementedError

    def with_options(self, *, enable_thinking: bool | None = None, default_system: str | None = None) -> "Template":
        """A copy with data options applied (`None` keeps the current value)."""
        changes = {}
        if enable_thinking is not None:
            changes["enable_thinking"] = enable_thinking
        if default_system is not None:
            changes["default_system"] = default_system
        return dataclasses.replace(self, **changes) if changes else self

    def fingerprint(self) -> str:
        """A string that changes whenever rendering would (used in the tokenized-data cache key)."""
        return repr(self)

    # ---- the API the trainer and the chat/API servers call -------------------------------------------------

    def encode_prompt(self, tokenizer, messages: list[dict], system: str | None = None) -> list[int]:
        """Ids of the conversation so far (ending on a user turn) followed by the assistant generation prefix."""
        messages, system = split_system(messages, system)
        if not messages or messages[-1]["role"] not in PROMPT_ROLES:
            raise KllamaError("a chat prompt must end with a user message")
        prompt_ids, _ = self.encode_oneturn(tokenizer, messages + [{"role": "assistant", "content": ""}], system)
        return prompt_ids

    def encode_pair(
        self, tokenizer, prompt_messages: list[dict], chosen: str, rejected: str, system: str | None,
        cutoff_len: int | None,
    ) -> tuple[list[int], list[int], list[int]]:
        """(prompt_ids, chosen_ids, rejected_ids) sharing one prompt, truncated with `truncate_lengths` on the
        longer response (no truncation when `cutoff_len` is None). Earlier turns belong to the prompt."""
        prompt_messages, system = split_system(prompt_messages, system)
        prompt_ids, chosen_ids = self.encode_oneturn(tokenizer, prompt_messages + [_assistant(chosen)], system)
        _, rejected_ids = self.encode_oneturn(tokenizer, prompt_messages + [_assistant(rejected)], system)
        if cutoff_len is not None:
            src, tgt = truncate_lengths(len(prompt_ids), max(len(chosen_ids), len(rejected_ids)), cutoff_len)
            prompt_ids, chosen_ids, rejected_ids = prompt_ids[:src], chosen_ids[:tgt], rejected_ids[:tgt]
        return prompt_ids, chosen_ids, rejected_ids

    def encode_sft(
        self, tokenizer, messages: list[dict], system: str | None, cutoff_len: int | None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a whole conversation; every assistant turn is trained, prompts get -100.
        Turns are truncated one by one with `truncate_lengths` against the budget the earlier turns left."""
        messages, system = split_system(messages, system)
        input_ids, labels = [], []
        for source, target in self.encode_multiturn(tokenizer, messages, system):
            if cutoff_len is not None:
                budget = cutoff_len - len(input_ids)
                if budget <= 0:
                    break
                src, tgt = truncate_lengths(len(source), len(target), budget)
                source, target = source[:src], target[:tgt]
            input_ids += source + target
            labels += [IGNORE_INDEX] * len(source) + target
        return input_ids, labels


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _fill(slots: Slots, content: str) -> list[Slot]:
    return [s.replace("{content}", content) if isinstance(s, str) else s for s in slots]


def _has_token(tokenizer, token: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid is not None and tid != tokenizer.unk_token_id


@dataclass(frozen=True)
class SlotTemplate(Template):
    """A template defined by text slots, rendered exactly as LLaMA-Factory renders the template of that name."""

    name: str
    user: Slots
    assistant: Slots
    system: Slots = ("{content}",)
    observation: Slots | None = None  # None: rendered with the user slots
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False  # the first stop word acts as eos (Llama 3 / ChatML models)
    system_in_first_user: bool = False  # Mistral: the system text is glued in front of the first user message
    reasoning: bool = False  # Qwen3: an empty <think> block is added when the answer has none
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    enable_thinking: bool = True

    def _eos_id(self, tokenizer) -> int | None:
        if self.replace_eos:
            return tokenizer.convert_tokens_to_ids(self.stop_words[0])
        return tokenizer.eos_token_id

    def _ids(self, tokenizer, slots: list[Slot]) -> list[int]:
        ids: list[int] = []
        for s in slots:
            if isinstance(s, str):
                if s:
                    ids += text_ids(tokenizer, s)
            elif s == BOS:
                if tokenizer.bos_token_id is not None:
                    ids.append(tokenizer.bos_token_id)
            elif s == EOS:
                eos = self._eos_id(tokenizer)
                if eos is not None:
                    ids.append(eos)
        return ids

    def _encode(self, tokenizer, messages: list[dict], system: str | None) -> list[list[int]]:
        """Ids per message; the first message also carries the prefix and the system prompt."""
        system = system or self.default_system
        role_slots = {
            "user": self.user, "assistant": self.assistant,
            "observation": self.observation or self.user, "function": self.assistant,
        }
        encoded = []
        for i, message in enumerate(messages):
            slots: list[Slot] = []
            content = message["content"]
            if i == 0:
                slots += list(self.prefix)
                if system:
                    if self.system_in_first_user:
                        head = _fill(self.system, system)[0]
                        content = head + content if message["role"] == "user" else content
                    else:
                        slots += _fill(self.system, system)
            if message["role"] not in role_slots:
                raise KllamaError(f"template {self.name!r} cannot render role {message['role']!r}")
            slots += _fill(role_slots[message["role"]], content)
            encoded.append(self._ids(tokenizer, slots))
        return encoded

    # Qwen3-style reasoning: strip old thoughts, and put an empty thought either in the prompt (thinking off:
    # not trained) or in front of the response (thinking on: trained), as LLaMA-Factory does.
    def _remove_thought(self, content: str) -> str:
        open_, close = self.thought_words
        pattern = re.compile(f"{re.escape(open_)}(.*?){re.escape(close)}", re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")

    def _has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def _empty_thought_ids(self, tokenizer) -> list[int]:
        return text_ids(tokenizer, self.thought_words[0] + self.thought_words[1])

    def encode_oneturn(self, tokenizer, messages, system):
        messages = [dict(m) for m in messages]
        if self.reasoning:
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self._remove_thought(messages[i]["content"])
            if not self.enable_thinking:
                messages[-1]["content"] = self._remove_thought(messages[-1]["content"])
        encoded = self._encode(tokenizer, messages, system)
        prompt_ids = [t for ids in encoded[:-1] for t in ids]
        response_ids = encoded[-1]
        if self.reasoning and not self._has_thought(messages[-1]["content"]):
            if self.enable_thinking:
                response_ids = self._empty_thought_ids(tokenizer) + response_ids
            else:
                prompt_ids = prompt_ids + self._empty_thought_ids(tokenizer)
        return prompt_ids, response_ids

    def encode_multiturn(self, tokenizer, messages, system):
        messages = [dict(m) for m in messages]
        if self.reasoning and not self.enable_thinking:
            for i in range(1, len(messages), 2):
                messages[i]["content"] = self._remove_thought(messages[i]["content"])
        encoded = self._encode(tokenizer, messages, system)
        pairs = []
        for i in range(0, len(encoded) - 1, 2):
            source, target = encoded[i], encoded[i + 1]
            if self.reasoning and not self._has_thought(messages[i + 1]["content"]):
                if self.enable_thinking:
                    target = self._empty_thought_ids(tokenizer) + target
                else:
                    source = source + self._empty_thought_ids(tokenizer)
            pairs.append((source, target))
        return pairs

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = [self._eos_id(tokenizer), tokenizer.eos_token_id]
        ids += [tokenizer.convert_tokens_to_ids(w) for w in self.stop_words if _has_token(tokenizer, w)]
        return sorted({i for i in ids if i is not None})


_LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML = dict(
    user=(_CHATML_USER,),
    assistant=("{content}<|im_end|>\n",),
    system=("<|im_start|>system\n{content}<|im_end|>\n",),
    observation=("<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",),
    stop_words=("<|im_end|>",),
    replace_eos=True,
)

# The named templates (facts from LLaMA-Factory's definitions of the same names).
TEMPLATES: dict[str, SlotTemplate] = {
    "llama3": SlotTemplate(
        name="llama3",
        user=(_LLAMA3_USER,),
        assistant=("{content}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    ),
    "deepseek": SlotTemplate(
        name="deepseek",
        user=("User: {content}\n\nAssistant:",),
        assistant=("{content}", EOS),
        system=("{content}\n\n",),
        prefix=(BOS,),
    ),
    "deepseek3": SlotTemplate(
        name="deepseek3",
        user=("<｜User｜>{content}<｜Assistant｜>",),
        assistant=("{content}", EOS),
        prefix=(BOS,),
    ),
    "qwen": SlotTemplate(
        name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **_CHATML
    ),
    "qwen3": SlotTemplate(name="qwen3", reasoning=True, **_CHATML),
    "mistral": SlotTemplate(
        name="mistral",
        user=("[INST] {content}[/INST]",),
        assistant=(" {content}", EOS),
        system=("{content}\n\n",),
        prefix=(BOS,),
        system_in_first_user=True,
    ),
    "empty": SlotTemplate(name="empty", user=("{content}",), assistant=("{content}",)),
}

# Tokens that end an answer in common chat templates; `auto` stops on those its template text uses.
_KNOWN_STOP_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>",
)
_JINJA_ROLES = {"user": "user", "assistant": "assistant", "observation": "tool", "function": "assistant"}


@dataclass(frozen=True)
class JinjaTemplate(Template):
    """`auto`: the tokenizer's own chat template; prompt/response split by rendering growing prefixes."""

    name: str = "auto"
    chat_template: str = field(default="", repr=True)
    default_system: str = ""
    enable_thinking: bool = True

    def _render(self, tokenizer, messages: list[dict], system: str | None, generation: bool) -> str:
        system = system or self.default_system
        conv = ([{"role": "system", "content": system}] if system else []) + [
            {"role": _JINJA_ROLES.get(m["role"], m["role"]), "content": m["content"]} for m in messages
        ]
        try:
            return tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=generation, enable_thinking=self.enable_thinking
            )
        except Exception as exc:  # Jinja raise_exception and template bugs surface here
            raise KllamaError(
                f"the tokenizer's chat_template failed to render a conversation ({exc}); set `template` to one of "
                f"{', '.join(TEMPLATES)}"
            ) from exc

    def _encode_text(self, tokenizer, text: str) -> list[int]:
        ids = text_ids(tokenizer, text) if text else []
        bos = tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:  # never double BOS
            ids = ids[1:]
        return ids

    def _texts(self, tokenizer, messages: list[dict], system: str | None) -> list[tuple[str, str]]:
        """(source text, target text) per exchange, checking that rendering only ever appends."""
        pairs, rendered = [], ""
        for k in range(1, len(messages), 2):
            prompt = self._render(tokenizer, messages[:k], system, generation=True)
            full = self._render(tokenizer, messages[: k + 1], system, generation=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise KllamaError(
                    "the tokenizer's chat_template rewrites earlier turns (it is not append-only), so prompt and "
                    f"response cannot be separated; set `template` to one of {', '.join(TEMPLATES)}"
                )
            pairs.append((prompt[len(rendered):], full[len(prompt):]))
            rendered = full
        return pairs

    def encode_oneturn(self, tokenizer, messages, system):
        if messages[-1]["content"] == "":  # generation prompt only
            return self._encode_text(tokenizer, self._render(tokenizer, messages[:-1], system, True)), []
        texts = self._texts(tokenizer, messages, system)
        prompt_text = "".join(s + t for s, t in texts[:-1]) + texts[-1][0]
        return self._encode_text(tokenizer, prompt_text), text_ids(tokenizer, texts[-1][1])

    def encode_multiturn(self, tokenizer, messages, system):
        out = []
        for i, (source, target) in enumerate(self._texts(tokenizer, messages, system)):
            src = self._encode_text(tokenizer, source) if i == 0 else text_ids(tokenizer, source)
            out.append((src, text_ids(tokenizer, target)))
        return out

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = {tokenizer.eos_token_id}
        ids |= {tokenizer.convert_tokens_to_ids(t) for t in _KNOWN_STOP_TOKENS if t in self.chat_template and _has_token(tokenizer, t)}
        return sorted(i for i in ids if i is not None)


def template_names() -> list[str]:
    """Valid values of `template`."""
    return ["auto", *TEMPLATES]


def get_template(
    name: str | None, tokenizer, *, enable_thinking: bool = True, default_system: str | None = None
) -> Template:
    """The template called `name` (`auto`/None = the tokenizer's own chat_template), checked against `tokenizer`.

    Named templates whose turns end with a special token (llama3's <|eot_id|>, ChatML's <|im_end|>) need it in the
    tokenizer's vocabulary, else the model would be trained on that marker spelled out as text. A tokenizer with no
    pad token gets eos as pad (as LLaMA-Factory does). Unknown name -> KllamaError listing the valid ones.
    """
    name = name or "auto"
    if name == "auto":
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise KllamaError(
                f"template: auto needs a tokenizer with a chat_template, and this one has none; set `template` to one "
                f"of {', '.join(TEMPLATES)}"
            )
        template: Template = JinjaTemplate(chat_template=tokenizer.chat_template)
    elif name in TEMPLATES:
        template = TEMPLATES[name]
        if template.replace_eos and not _has_token(tokenizer, template.stop_words[0]):
            raise KllamaError(
                f"template {name!r} ends each turn with {template.stop_words[0]!r}, which this tokenizer does not "
                f"have as a token; pick the template of your model's family (one of {', '.join(template_names())})"
            )
    else:
        raise KllamaError(f"unknown template {name!r}; choose one of: {', '.join(template_names())}")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return template.with_options(enable_thinking=enable_thinking, default_system=default_system)
