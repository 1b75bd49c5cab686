"""`kllama chat`: a terminal REPL with streamed answers and multi-turn history.

Interactive use prints a prompt and reads lines; piped stdin is read one prompt per line (for scripts and tests).
`clear` forgets the history, `exit` quits; Ctrl-C stops the answer being written and keeps the program running.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import IO, Callable

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.engine import FINISH_CANCELLED, GenerationEngine, build_engine
from kllama.infer.prompt import Messages
from kllama.infer.sampling import SamplingParams

WELCOME = "kllama chat: type a message; `clear` forgets the history, `exit` quits, Ctrl-C stops an answer."


@dataclass
class ChatSession:
    """A conversation with the engine: the history, the system prompt, and the answer streaming."""

    engine: GenerationEngine
    system: str | None = None
    history: Messages = field(default_factory=list)
    params: SamplingParams | None = None  # None: the engine's defaults (the config's generation section)

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.history.clear()

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `text` through `write` and keep both turns in the history; returns the answer.
        A KeyboardInterrupt while streaming ends the answer early and keeps what was written."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt_ids = self.engine.encode(messages, self.system)
        parts: list[str] = []
        # closing(): an interrupt between two chunks must end the generator now, which frees the engine's lock.
        try:
            with contextlib.closing(self.engine.stream(prompt_ids, self.params or self.engine.defaults)) as chunks:
                for chunk in chunks:
                    if chunk.finish_reason == FINISH_CANCELLED:
                        break
                    write(chunk.text)
                    parts.append(chunk.text)  # after write: the history holds what the user saw
        except KeyboardInterrupt:
            write(" [stopped]")
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


def repl(session: ChatSession, stdin: IO[str], out: IO[str], interactive: bool) -> None:
    """Read prompts until `exit` or end of input, streaming each answer to `out`."""
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
        write("\n")


def run_chat(config: KllamaConfig) -> int:
    """Entry point of `kllama chat`: load the model per the config and run the REPL on stdin/stdout."""
    engine = build_engine(config)
    system = config.generation.system or config.data.default_system
    interactive = sys.stdin.isatty()
    if interactive:
        print(WELCOME)
    repl(ChatSession(engine, system), sys.stdin, sys.stdout, interactive)
    return 0
