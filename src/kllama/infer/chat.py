"""`kllama chat`: a terminal REPL with streamed answers and multi-turn history.

Interactive use prints a prompt and reads lines; piped stdin is read one prompt per line (for scripts and tests).
`clear` forgets the history, `exit` quits; Ctrl-C stops the answer being written and keeps the program running.
After each answer one line on stderr gives its speed, as KTransformers' `local_chat` does: the prompt's tokens and
the time to the first answer token (prefill), the answer's tokens and their rate after the first (decode). On stderr,
so a piped stdout holds the answers only.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Callable

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.engine import FINISH_CANCELLED, GenerationEngine, build_engine
from kllama.infer.prompt import Messages
from kllama.infer.sampling import SamplingParams

WELCOME = "kllama chat: type a message; `clear` forgets the history, `exit` quits, Ctrl-C stops an answer."


@dataclass(frozen=True)
class AnswerTiming:
    """How long one answer took: the prompt fed (prefill, up to the first answer token) and the tokens after it."""

    prompt_tokens: int
    first_token_s: float  # from the request to the first answer token: the prefill and one sampled token
    answer_tokens: int
    after_first_s: float  # from the first answer token to the last

    def line(self) -> str:
        """`[prompt 23 tokens, first token 0.044 s; answer 128 tokens, 157.2 tok/s]`"""
        rate = (self.answer_tokens - 1) / self.after_first_s if self.answer_tokens > 1 and self.after_first_s > 0 \
            else 0.0
        return (f"[prompt {self.prompt_tokens} tokens, first token {self.first_token_s:.3f} s; "
                f"answer {self.answer_tokens} tokens, {rate:.1f} tok/s]")


@dataclass
class ChatSession:
    """A conversation with the engine: the history, the system prompt, and the answer streaming."""

    engine: GenerationEngine
    system: str | None = None
    history: Messages = field(default_factory=list)
    params: SamplingParams | None = None  # None: the engine's defaults (the config's generation section)
    timing: AnswerTiming | None = None  # of the last answer

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.history.clear()

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `text` through `write` and keep both turns in the history; returns the answer.
        A KeyboardInterrupt while streaming ends the answer early and keeps what was written."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt_ids = self.engine.encode(messages, self.system)
        parts: list[str] = []
        start, first, tokens = time.perf_counter(), None, 0
        # closing(): an interrupt between two chunks must end the generator now, which frees the engine's lock.
        try:
            with contextlib.closing(self.engine.stream(prompt_ids, self.params or self.engine.defaults)) as chunks:
                for chunk in chunks:
                    tokens = chunk.completion_tokens or tokens  # the last chunk counts the answer's tokens
                    if chunk.finish_reason == FINISH_CANCELLED:
                        break
                    if first is None:  # the first answer token always comes as a chunk of its own
                        first = time.perf_counter()
                    write(chunk.text)
                    parts.append(chunk.text)  # after write: the history holds what the user saw
        except KeyboardInterrupt:
            write(" [stopped]")
        end = time.perf_counter()
        # an answer stopped by Ctrl-C has no count: no timing rather than a wrong one
        self.timing = AnswerTiming(len(prompt_ids), first - start, tokens, end - first) \
            if first is not None and tokens else None
        answer = "".join(parts)
        self.history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        return answer


# REPL words -> what they do to the session (return False to quit)
def _clear(session: ChatSession, out: IO[str]) -> bool:
    session.clear()
    out.write("History has been removed.\n")
    return True


COMMANDS: dict[str, Callable[[ChatSession, IO[str]], bool]] = {
    "clear": _clear,
    "exit": lambda session, out: False,
}


def _read_line(interactive: bool, stdin: IO[str], out: IO[str]) -> str | None:
    """The next user line, or None at end of input."""
    if interactive:
        try:
            return input("\nUser: ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def repl(session: ChatSession, stdin: IO[str], out: IO[str], interactive: bool, err: IO[str] | None = None) -> None:
    """Read prompts until `exit` or end of input, streaming each answer to `out`; each answer's speed goes to `err`
    (one line) when given."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = _read_line(interactive, stdin, out)
        except KeyboardInterrupt:  # at the prompt: say how to leave instead of dying with a traceback
            out.write("\n(type exit or press Ctrl-D to quit)\n")
            continue
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        command = COMMANDS.get(text.lower())
        if command is not None:
            if not command(session, out):
                return
            continue
        write("Assistant: ")
        try:
            session.answer(text, write)
        except KllamaError as exc:  # e.g. the history outgrew the context: tell the user, keep the session
            write(f"[error] {exc}")
            session.timing = None
        write("\n")
        if err is not None and session.timing is not None:
            err.write(session.timing.line() + "\n")
            err.flush()


def run_chat(config: KllamaConfig) -> int:
    """Entry point of `kllama chat`: load the model per the config and run the REPL on stdin/stdout."""
    engine = build_engine(config)
    if engine.compile_note:
        print(f"kllama chat: {engine.compile_note}", file=sys.stderr, flush=True)
    if engine.warmup_s is not None:  # on stderr with the answers' timing lines: a piped stdout holds answers only
        print(f"kllama chat: warm-up prefill + decode step: {engine.warmup_s:.1f} s", file=sys.stderr, flush=True)
    system = config.generation.system or config.data.default_system
    interactive = sys.stdin.isatty()
    if interactive:
        print(WELCOME)
    repl(ChatSession(engine, system), sys.stdin, sys.stdout, interactive, err=sys.stderr)
    return 0
