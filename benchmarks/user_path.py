"""The path a user takes, as a benchmark: `kllama train` on the shipped example YAML, then chat, api and export.

    PYTHONPATH=src python benchmarks/user_path.py --model v2lite --work /tmp/kllama_user_path \
        --set max_gpu_memory=24GB

Nothing here calls kllama's Python API for the measured work: every phase runs the `kllama` CLI in a subprocess,
exactly as a user types it, with the example YAML verbatim and only paths overridden (`model_name_or_path`,
`dataset_dir`, `output_dir`, `adapter_name_or_path`, `export_dir`) plus the `--set` overrides named on the command
line (recorded in the JSON). Phases (`--phases`, default all):

* `write`  -- a full-size hub-layout checkpoint with random weights (`kllama.model.tiny.write_tiny_model` with the
  real config's shapes), written once and reused while its directory exists;
* `data`   -- a `dpo_en_demo`-shaped dataset (300 sharegpt ranking pairs, ~1,000 tokens a pair, lengths spread like a
  real preference set) in a fresh `dataset_dir`;
* `train`  -- the example train YAML; host RSS of the whole process tree (parent + data-loader and tokenizer workers)
  sampled every 0.25 s (PSS, shared pages counted once); tokens/s, peak GPU and host per logged step from `trainer_state.json`;
* `chat`   -- the example inference YAML, two questions piped on stdin: load time, the first answer's speed from the
  line chat writes after it (first-token time, decode tok/s), and the second answer's first-token time (a prompt
  length the process has not read);
* `api`    -- the same YAML served by `kllama api` on 127.0.0.1; the official `openai` client sends one warm-up, one
  stream alone, then `--concurrency` concurrent streaming requests of `--max-tokens` tokens (`ignore_eos`), measured
  as `serve.py` measures a level: time to first token, decode tok/s of one stream, aggregate tok/s; then 4 requests
  one at a time, each prompt longer than any before (time to first token of a new prompt length);
* `export` -- the example merge YAML: merge the adapter into the base and write it (skipped when the disk lacks the
  space for a second copy of the model).

Writes `results/user_path_<model>_<date>.json` (and a copy under `$OUT`) and prints one table.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FULL_SHAPES, environment, format_table, log, write_results  # noqa: E402
from serve import run_level, run_new_lengths  # noqa: E402

from kllama.train.launch import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES: dict[str, dict[str, str]] = {
    "v2lite": {
        "train": "examples/train_lora/deepseek2_lora_dpo_kt.yaml",
        "infer": "examples/inference/deepseek2_lora_dpo_kt.yaml",
        "export": "examples/merge_lora/deepseek2_lora_dpo.yaml",
    },
    "qwen3-30b": {
        "train": "examples/train_lora/qwen3moe_lora_dpo_kt.yaml",
        "infer": "examples/inference/deepseek2_lora_dpo_kt.yaml",
        "export": "examples/merge_lora/deepseek2_lora_dpo.yaml",
    },
}
PHASES = ("write", "data", "train", "chat", "api", "export")
PROMPT = "Explain in two sentences why the sky is blue."
# chat's second question: a prompt length the process has not read (chat's first-token time for a new length)
SECOND_PROMPT = "Now explain, in three sentences and without formulas, why sunsets are red and orange instead."
NEW_LENGTHS = 4  # api requests after the levels, one at a time, each prompt longer than any before

COLUMNS = (
    ("phase", "phase", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{}"),
    ("peak_gpu_gb", "peak GPU GB", "{}"),
    ("streamed_layers", "streamed layers", "{}"),
    ("peak_host_gb", "peak host GB (tree PSS)", "{:.1f}"),
    ("exit_s", "exit s", "{:.1f}"),
    ("note", "note", "{}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(EXAMPLES), default="v2lite")
    p.add_argument("--work", type=Path, default=Path("/tmp/kllama_user_path"), help="model, data and outputs")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {'|'.join(PHASES)}")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra key=value for train (repeatable), e.g. max_gpu_memory=24GB")
    p.add_argument("--infer-set", dest="infer_overrides", action="append", default=[],
                   help="extra key=value for chat/api (repeatable)")
    p.add_argument("--pairs", type=int, default=300, help="preference pairs in the generated dataset")
    p.add_argument("--pair-tokens", type=int, default=1000, help="mean tokens of one pair (chosen + rejected)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where `export` writes the merged model (default <work>/export; e.g. /dev/shm/export when the "
                        "disk holds only one full-size model); removed afterwards")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    p.add_argument("--tag", default="", help="suffix for the JSON name")
    p.add_argument("--out-dir", type=Path, default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- process tree memory
class TreeMemory:
    """Samples the memory of a process and all its descendants every `interval` s (psutil).

    Two totals: the sum of resident set sizes, which counts a page shared by a parent and its forked workers once
    per process, and the sum of proportional set sizes (PSS, Linux), which splits each shared page among the
    processes mapping it and so adds up to the memory really used."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss_gb = self.peak_pss_gb = self.peak_root_gb = 0.0
        self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _sizes(proc: Any) -> tuple[int, int]:
        import psutil

        try:
            full = proc.memory_full_info()
            return full.rss, getattr(full, "pss", full.rss)
        except psutil.AccessDenied:
            rss = proc.memory_info().rss
            return rss, rss
        except psutil.Error:
            return 0, 0

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._root] + self._root.children(recursive=True)
                sizes = [self._sizes(p) for p in procs]
                self.peak_root_gb = max(self.peak_root_gb, sizes[0][0] / 1e9)
                self.peak_rss_gb = max(self.peak_rss_gb, sum(r for r, _ in sizes) / 1e9)
                self.peak_pss_gb = max(self.peak_pss_gb, sum(p for _, p in sizes) / 1e9)
                self.peak_children = max(self.peak_children, len(procs) - 1)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_host_gb": self.peak_pss_gb, "peak_host_rss_sum_gb": self.peak_rss_gb,
                "peak_parent_host_gb": self.peak_root_gb, "max_child_processes": self.peak_children}


def log_file(args: argparse.Namespace, paths: dict[str, Path], phase: str) -> Path:
    """Where a phase's output goes (`$OUT` on the GPU box), tagged so several runs do not overwrite each other."""
    return paths["logs"] / f"{args.tag + '_' if args.tag else ''}{phase}.log"


def kllama_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kllama", *args]


class Cut(Exception):
    """A SIGTERM (a `timeout` around this script, a job limit) arrived: stop, keeping what was measured."""


@contextlib.contextmanager
def cut_on_sigterm() -> Iterator[None]:
    """Inside the block a SIGTERM raises `Cut` (in the main thread) instead of ending the process, so the phase in
    progress reports what it had and the JSON is still written; the previous handler is restored after. Only the
    first SIGTERM raises: `timeout` signals the command and then its whole process group, so a second one follows
    while the first is being handled."""
    raised = []

    def cut(signum: int, frame: Any) -> None:
        if not raised:
            raised.append(signum)
            raise Cut(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, cut)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(args: list[str], log_path: Path, *, stdin: str | None = None, env: dict[str, str] | None = None,
            ) -> dict[str, Any]:
    """Run one kllama command, echoing its output to ours and to `log_path`; returns exit code, wall, memory and
    `exit_s`, the seconds from its last line of output to its exit (freeing tens of GB of pinned memory, ...).

    A `Cut` while it runs ends the command (SIGTERM, then SIGKILL after 5 s) and returns what was seen, with a
    note and `cut: true`."""
    log(f"$ {' '.join(args)}")
    start = time.perf_counter()
    cut = False
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env={**os.environ, **(env or {})})
        memory = TreeMemory(proc.pid)
        last_line = start
        try:
            if stdin is not None:
                proc.stdin.write(stdin)
                proc.stdin.close()
            for line in proc.stdout:
                last_line = time.perf_counter()
                sink.write(line)
                if "\r" not in line:  # progress bars are in the log file, not on our screen
                    print("  | " + line.rstrip(), flush=True)
            code = proc.wait()
        except Cut:
            cut = True
            proc.terminate()
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    end = time.perf_counter()
    result = {"exit_code": code, "wall_s": end - start, **memory.stop(), "log": log_path.name}
    if cut:
        result.update(cut=True, note=f"cut by SIGTERM after {end - start:.0f} s: the command was ended; "
                                     "what it logged until then is kept")
    else:
        result["exit_s"] = end - last_line
        if code < 0:
            result["note"] = f"killed by signal {signal.Signals(-code).name}"
    return result


# ----------------------------------------------------------------------------- phases
def write_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """A full-size (or --tiny) hub-layout checkpoint with random weights, reused while it exists."""
    import torch

    from kllama.model.tiny import write_tiny_model

    marker = model_dir / ".complete"
    if marker.exists():
        return {"wall_s": 0.0, "note": "reused"}
    shutil.rmtree(model_dir, ignore_errors=True)
    arch, fields = FULL_SHAPES[args.model]
    fields = {} if args.tiny else fields  # --tiny: the family's tiny shapes
    start = time.perf_counter()
    write_tiny_model(model_dir, arch, dtype=torch.bfloat16, **fields)
    marker.write_text("ok\n")
    return {"wall_s": time.perf_counter() - start}


def checkpoint_gb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e9


def write_dataset(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """`dpo_en_demo` in LLaMA-Factory's sharegpt ranking format: `--pairs` pairs whose lengths spread around
    `--pair-tokens` (prompt ~20 %, each answer ~40 %), drawn from kllama's bundled English corpus."""
    corpus_path = REPO / "src" / "kllama" / "resources" / "tokenizer_corpus.txt"
    words = corpus_path.read_text().split()
    rng = random.Random(0)

    def text(n_words: int) -> str:
        start = rng.randrange(0, max(1, len(words) - n_words))
        return " ".join(words[start:start + n_words])

    rows = []
    words_per_token = 0.75  # English words per BPE token, roughly
    for _ in range(args.pairs):
        pair_words = max(30, int(rng.lognormvariate(0, 0.45) * args.pair_tokens * words_per_token))
        prompt, answer = max(5, pair_words // 5), max(10, pair_words * 2 // 5)
        rows.append({
            "conversations": [{"from": "human", "value": text(prompt)}],
            "chosen": {"from": "gpt", "value": text(answer)},
            "rejected": {"from": "gpt", "value": text(int(answer * rng.uniform(0.6, 1.4)))},
        })
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dpo_en_demo.json").write_text(json.dumps(rows))
    info = {"dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True,
                            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return {"wall_s": 0.0, "pairs": len(rows)}


def train(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    out = paths["train_out"]
    cmd = kllama_cmd("train", EXAMPLES[args.model]["train"], f"model_name_or_path={paths['model']}",
                     f"dataset_dir={paths['data']}", f"output_dir={out}", *args.overrides)
    result = run_cli(cmd, log_file(args, paths, "train"))
    result.update(expert_layer_facts(log_file(args, paths, "train").read_text(errors="replace")))
    for line in result["promotions"]:
        log(line)
    state_path = out / "trainer_state.json"
    history = json.loads(state_path.read_text())["log_history"] if state_path.exists() else \
        logged_history(log_file(args, paths, "train").read_text(errors="replace"))
    if history:
        steps = [h for h in history if "tokens_per_second" in h]
        result["steps"] = [{k: h.get(k) for k in ("step", "loss", "tokens_per_second", "peak_gpu_memory_gb",
                                                   "peak_host_memory_gb", "grad_norm")} for h in steps]
        rates = [h["tokens_per_second"] for h in steps]
        if rates:
            # the first logged window includes warm-up (first copies, allocator growth): report it apart
            steady = rates[1:] or rates
            result["tokens_per_s"] = f"{min(steady):,.0f}-{max(steady):,.0f}"
            result["tokens_per_s_median"] = sorted(steady)[len(steady) // 2]
            result["first_window_tokens_per_s"] = rates[0]
            result["peak_gpu_gb"] = max(h.get("peak_gpu_memory_gb") or 0 for h in steps) or None
        final = [h for h in history if "train_runtime" in h]
        if final:
            result["train_runtime_s"] = final[-1]["train_runtime"]
    result["host_rss_over_checkpoint"] = result["peak_host_gb"] / max(checkpoint_gb(paths["model"]), 1e-9)
    return result


def logged_history(log_text: str) -> list[dict[str, Any]]:
    """The Trainer's logged dicts (`{'loss': '0.69', ..., 'tokens_per_second': '8961', ...}` lines) of a run that
    left no `trainer_state.json` (cut before its end), in order, numbers as numbers (the lines carry no step)."""
    history: list[dict[str, Any]] = []
    for line in log_text.splitlines():
        text = line.strip()
        if not (text.startswith("{'") and text.endswith("}")):
            continue
        try:
            entry = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(entry, dict):
            history.append({k: _number(v) for k, v in entry.items()})
    return history


def _number(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


_STREAMED_AT_START = (re.compile(r"each pass copies (\d+) layers"), re.compile(r"each pass has (\d+) streamed"))
_PROMOTED = re.compile(r"promoted \d+ more layers? after step [^\r\n]*")
_STREAMED_AFTER = re.compile(r"; (\d+) of (\d+) MoE layers stream")


def expert_layer_facts(log_text: str) -> dict[str, Any]:
    """What a train log says about its expert layers: streamed layers per pass at start (the micro-batching line),
    the measured-step promotion lines, the streamed layers after the last promotion, and whether the DPO reference
    ran in lock-step with the policy."""
    start = next((int(m.group(1)) for line in log_text.splitlines() if line.startswith("micro-batching:")
                  for pattern in _STREAMED_AT_START if (m := pattern.search(line))), None)
    # anywhere on a line: a log written before the line went through tqdm.write has it after the step bar
    promotions = [m.group(0).strip() for m in _PROMOTED.finditer(log_text)]
    final = _STREAMED_AFTER.search(promotions[-1]) if promotions else None
    return {"streamed_layers_at_start": start, "promotions": promotions,
            "streamed_layers": int(final.group(1)) if final else start,
            "lockstep_reference": "DPO reference: computed inside the policy's forward" in log_text}


def infer_overrides(args: argparse.Namespace, paths: dict[str, Path]) -> list[str]:
    return [f"model_name_or_path={paths['model']}", f"adapter_name_or_path={paths['train_out']}",
            *args.infer_overrides]


# the line `kllama chat` writes to stderr after each answer (kllama.infer.chat.AnswerTiming.line)
CHAT_TIMING = re.compile(r"\[prompt (\d+) tokens, first token ([\d.]+) s; answer (\d+) tokens, ([\d.]+) tok/s\]")


def chat(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    """Two questions piped to `kllama chat`, each answer up to `--max-tokens` long; the speed from chat's own
    line after the first (tokens counted by the engine, so a random model's text-less ids count too) and the
    first-token time of both (the second: a prompt length the process has not read)."""
    cmd = kllama_cmd("chat", EXAMPLES[args.model]["infer"], *infer_overrides(args, paths),
                     f"max_new_tokens={args.max_tokens}")
    result = run_cli(cmd, log_file(args, paths, "chat"), stdin=PROMPT + "\n" + SECOND_PROMPT + "\n")
    timings = CHAT_TIMING.findall(log_file(args, paths, "chat").read_text(errors="replace"))
    if timings:
        prompt, first_s, tokens, rate = timings[0]
        result.update(prompt_tokens=int(prompt), first_token_s=float(first_s), answer_tokens=int(tokens),
                      decode_tok_s=float(rate), tokens_per_s=f"{float(rate):.1f}",
                      note=f"first token {float(first_s):.3f} s after a {prompt}-token prompt")
    if len(timings) > 1:  # the second turn: the history plus a new question, a prompt length not read before
        prompt, first_s, _, _ = timings[1]
        result.update(second_prompt_tokens=int(prompt), second_first_token_s=float(first_s))
        result["note"] += f"; 2nd answer {float(first_s):.3f} s after {prompt} tokens"
    return result


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kllama api exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"kllama api not ready after {timeout:.0f} s")


def _drive(base_url: str, key: str, n: int, max_tokens: int) -> dict[str, Any]:
    """One warm-up stream, then one stream alone and `n` at once, measured as `serve.py` measures a level: tokens
    from the server's usage count, not from content chunks (a random full-size model picks mostly ids its small test
    tokenizer has no text for, so its chunks are sparse)."""
    asyncio.run(run_level(base_url, key, 1, max_tokens))
    single = asyncio.run(run_level(base_url, key, 1, max_tokens))
    many = asyncio.run(run_level(base_url, key, n, max_tokens))
    fresh = asyncio.run(run_new_lengths(base_url, key, NEW_LENGTHS, min(max_tokens, 8)))
    return {"single_stream": single, "concurrent": many, "new_lengths": fresh,
            "single_decode_tok_s": 1e3 / single["tpot_p50_ms"] if single["tpot_p50_ms"] else 0.0}


def api(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = kllama_cmd("api", EXAMPLES[args.model]["infer"], *infer_overrides(args, paths))
    log(f"$ API_PORT={port} API_KEY=user-path {' '.join(cmd)}")
    log_path = log_file(args, paths, "api")
    start = time.perf_counter()
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "API_PORT": str(port), "API_HOST": "127.0.0.1",
                                     "API_KEY": "user-path"})
        memory = TreeMemory(proc.pid)
        try:
            ready_s = _wait_healthy(base, proc, timeout=480)
            result: dict[str, Any] = {"ready_s": ready_s}
            result.update(_drive(base, "user-path", args.concurrency, args.max_tokens))
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the run goes on
            result = {"note": f"failed: {exc}"}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update(memory.stop(), wall_s=time.perf_counter() - start, exit_code=proc.returncode, log=log_path.name)
    if "concurrent" in result:
        single, many = result["single_stream"], result["concurrent"]
        result["tokens_per_s"] = (f"{result['single_decode_tok_s']:.1f} x1, {many['aggregate_tok_s']:.1f} "
                                  f"x{args.concurrency}")
        fresh = result["new_lengths"]
        result.setdefault("note", f"TTFT 1 stream {single['ttft_p50_s']:.3f} s; p50 x{args.concurrency} "
                                  f"{many['ttft_p50_s']:.3f} s; new prompt lengths p50 {fresh['ttft_p50_s']:.3f} s, "
                                  f"max {fresh['ttft_max_s']:.3f} s")
    return result


def export(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    need = checkpoint_gb(paths["model"]) * 1.05e9
    target = paths["export"]
    target.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(target.parent).free < need:
        return {"wall_s": 0.0, "note": f"skipped: {target.parent} has less than {need / 1e9:.0f} GB free"}
    cmd = kllama_cmd("export", EXAMPLES[args.model]["export"], f"model_name_or_path={paths['model']}",
                     f"adapter_name_or_path={paths['train_out']}", f"export_dir={target}")
    result = run_cli(cmd, log_file(args, paths, "export"))
    result["export_gb"] = checkpoint_gb(target) if target.exists() else None
    shutil.rmtree(target, ignore_errors=True)  # the disk holds one full-size model at a time
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    work = args.work.resolve()
    logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else work / "logs"
    paths = {"model": work / f"model_{args.model}{'_tiny' if args.tiny else ''}", "data": work / "data",
             "train_out": work / "saves" / f"{args.model}_dpo", "export": args.export_dir or work / "export",
             "logs": logs}
    logs.mkdir(parents=True, exist_ok=True)
    actions = {"write": lambda: write_model(args, paths["model"]), "data": lambda: write_dataset(args, paths["data"]),
               "train": lambda: train(args, paths), "chat": lambda: chat(args, paths),
               "api": lambda: api(args, paths), "export": lambda: export(args, paths)}
    result: dict[str, Any] = {"model": args.model, "tiny": args.tiny, "train_overrides": args.overrides,
                              "infer_overrides": args.infer_overrides, "environment": environment(), "phases": {}}
    stem = f"user_path_{args.model}{'_tiny' if args.tiny else ''}{'_' + args.tag if args.tag else ''}"
    with cut_on_sigterm():
        for phase in phases:
            log(f"phase {phase}")
            try:
                result["phases"][phase] = actions[phase]()
            except Cut as cut:  # outside a CLI run (writing the model, ...): the phase says where it stopped
                result["phases"][phase] = {"cut": True, "note": f"cut by {cut} during the phase"}
            if paths["model"].exists():
                result["checkpoint_gb"] = checkpoint_gb(paths["model"])
            write_results(result, stem, args.out_dir)  # after every phase: a run cut short keeps what it measured
            if result["phases"][phase].get("cut"):
                log(f"cut by SIGTERM during {phase}: later phases skipped")
                break
    rows = [{"phase": name, **{k: v for k, v in data.items() if k != "steps"}}
            for name, data in result["phases"].items()]
    print(format_table(rows, COLUMNS), flush=True)
    if any(data.get("cut") for data in result["phases"].values()):
        return 124  # as `timeout` reports a command it ended
    failed = [name for name, data in result["phases"].items() if data.get("exit_code") not in (None, 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
