"""`kllama chat` with piped stdin: streamed answers, multi-turn history, `clear`, `exit`, the template warning."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from kllama.infer.chat import AnswerTiming, ChatSession, repl
from kllama.infer.sampling import SamplingParams

SYSTEM = "You are kllama."
PARAMS = SamplingParams(max_new_tokens=8, do_sample=False)


def expected_answer(engine, turns: list[dict]) -> str:  # noqa: ANN001
    return engine.complete(engine.encode(turns, SYSTEM), PARAMS).text


def test_chat_subprocess_with_history_clear_and_exit(moe_model: Path, moe_adapter: Path, engine) -> None:  # noqa: ANN001
    stdin = "Hello there\n\nHow are you?\nclear\nHello there\nexit\nnever answered\n"
    args = [sys.executable, "-m", "kllama.cli", "chat", f"model_name_or_path={moe_model}",
            f"adapter_name_or_path={moe_adapter}", "template=deepseek", "infer_dtype=float32", "do_sample=false",
            "max_new_tokens=8", f"system={SYSTEM}"]
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first = expected_answer(engine, [{"role": "user", "content": "Hello there"}])
    second = expected_answer(engine, [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                                      {"role": "user", "content": "How are you?"}])
    assert done.stdout == (f"Assistant: {first}\nAssistant: {second}\nHistory has been removed.\n"
                           f"Assistant: {first}\n")
    assert "trained with template 'llama3'" in done.stderr  # the adapter's template.json says llama3
    # one speed line per answer on stderr, counting the prompt and answer tokens the engine saw
    hello = [{"role": "user", "content": "Hello there"}]
    counted = [(len(engine.encode(hello, SYSTEM)), engine.complete(engine.encode(hello, SYSTEM), PARAMS).completion_tokens)]
    timings = re.findall(r"^\[prompt (\d+) tokens, first token [\d.]+ s; answer (\d+) tokens, [\d.]+ tok/s\]$",
                         done.stderr, flags=re.M)
    assert len(timings) == 3
    assert (int(timings[0][0]), int(timings[0][1])) == counted[0] == (int(timings[2][0]), int(timings[2][1]))


def test_repl_keeps_history_until_clear(engine) -> None:  # noqa: ANN001
    session = ChatSession(engine, system=SYSTEM, params=PARAMS)
    out = io.StringIO()
    repl(session, io.StringIO("one\ntwo\n"), out, interactive=False)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    repl(session, io.StringIO("clear\n"), out, interactive=False)
    assert session.history == []


def test_ctrl_c_stops_the_answer_not_the_session(engine) -> None:  # noqa: ANN001
    session = ChatSession(engine, system=SYSTEM, params=SamplingParams(max_new_tokens=50, do_sample=False, ignore_eos=True))
    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if len(written) == 2:  # the user presses Ctrl-C while the second piece is shown
            raise KeyboardInterrupt

    partial = session.answer("Hello there", write)
    assert written[-1] == " [stopped]" and partial == written[0]
    assert session.timing is None  # a stopped answer has no token count: no speed line rather than a wrong one
    assert engine.batch.sequences == 0  # the stopped answer gave its cache slot back
    assert session.history[-1] == {"role": "assistant", "content": partial}
    # the engine is free again (its lock was released) and the conversation goes on
    session.params = PARAMS
    assert session.answer("Go on", lambda text: None) == expected_answer(
        engine, [*session.history[:2], {"role": "user", "content": "Go on"}])
    assert session.timing is not None and session.timing.answer_tokens >= 1


def test_timing_line_reports_the_rate_after_the_first_token() -> None:
    timing = AnswerTiming(prompt_tokens=23, first_token_s=0.0441, answer_tokens=129, after_first_s=0.8)
    assert timing.line() == "[prompt 23 tokens, first token 0.044 s; answer 129 tokens, 160.0 tok/s]"
    assert AnswerTiming(5, 0.01, 1, 0.0).line().endswith("answer 1 tokens, 0.0 tok/s]")
