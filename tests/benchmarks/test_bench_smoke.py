"""The GPU benchmarks run end to end on tiny CPU models, so they cannot rot between GPU sessions.

The scripts run as subprocesses (concurrently, to stay fast) the way the lead runs them on the GPU box, with
`datasets` and `fastapi` made unimportable as they are there, and on the CPU on any machine (`--tiny` is the CPU
smoke mode; a GPU hidden from them, so the same rows are checked on a GPU machine).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Runs a script as __main__ with the GPU box's missing packages hidden (None in sys.modules = not installed).
_LAUNCH = (
    "import runpy, sys; "
    "[sys.modules.__setitem__(m, None) for m in ('datasets', 'fastapi', 'uvicorn', 'sse_starlette')]; "
    "script = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')"
)


def _env() -> dict[str, str]:
    # src first, then the caller's path (the GPU machine's carried wheels are found through PYTHONPATH)
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    return env


def _start(script: str, *args: str, log: Path | None = None) -> subprocess.Popen:
    """Starts `script` with the GPU box's missing packages hidden; its output goes to a pipe, or to `log` (a run
    that waits for its test while others run must not block on a full pipe)."""
    return _popen([sys.executable, "-c", _LAUNCH, str(ROOT / "benchmarks" / script), *args], log)


def _popen(command: list[str], log: Path | None) -> subprocess.Popen:
    if log is None:
        return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    with log.open("w") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> str:
    """Waits for `proc`; its output (from the pipe, or from `log` when `_start` wrote there); it must succeed."""
    out, _ = proc.communicate(timeout=timeout)
    out = log.read_text() if log is not None else out
    assert proc.returncode == 0, out[-4000:]
    return out


def _only_json(directory: Path) -> dict:
    files = list(directory.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_benchmarks_run_tiny_on_cpu(tmp_path: Path) -> None:
    dpo_dir, decode_dir = tmp_path / "dpo", tmp_path / "decode"
    dpo = _start("dpo_throughput.py", "--tiny", "--baseline", "--placements", "stream,auto,gpu,cpu",
                 "--precomputed-ref", "2", "--out-dir", str(dpo_dir))
    decode = _start("decode.py", "--tiny", "--cpu-threads", "1", "--placements", "auto,cpu,gpu",
                    "--out-dir", str(decode_dir))  # row names carry the thread count: fix it on any machine
    dpo_log, decode_log = _finish(dpo), _finish(decode)

    result = _only_json(dpo_dir)
    rows = {row["name"]: row for row in result["rows"]}
    for name in ("kllama stream", "kllama auto", "kllama gpu", "stock+peft (full logps)",
                 "stock+peft (chunked logps)"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["s_per_step"] > 0, rows[name]
    precomputed = rows["kllama stream, ref precomputed (x2)"]
    assert precomputed["policy_step_s"] > 0 and precomputed["reference_pass_s"] > 0
    assert precomputed["s_per_step"] == precomputed["policy_step_s"] + precomputed["reference_pass_s"] / 2
    cpu = next(row for name, row in rows.items() if name.startswith("kllama cpu"))
    assert cpu["tokens_per_s"] > 0 and "extrapolated" in cpu["note"]
    # every engine row splits its step time; expert passes were seen (ref + policy + recompute + backward)
    assert rows["kllama stream"]["expert_passes"] >= 4 * 2 and rows["kllama stream"]["expert_s"] > 0
    # the reference as `kllama train` computes it: in lock-step where layers stream, its own pass where none does
    assert rows["kllama stream"]["reference"] == "lock-step" and rows["kllama stream"]["streamed_layers"] > 0
    assert rows["kllama gpu"]["reference"] == "own pass" and rows["kllama gpu"]["streamed_layers"] == 0
    assert result["tokens_per_step"] == 2 * result["pairs"] * result["seq"]
    assert result["kt_kernel"]["status"]  # recorded whether or not kt_kernel imports
    assert "run" in dpo_log and "tokens/s" in dpo_log  # the printed table

    decoded = _only_json(decode_dir)
    rows = {row["name"].split(" (")[0] + (" eager" if "eager" in row["name"] else ""): row
            for row in decoded["rows"]}
    assert list(rows) == ["kllama auto", "kllama cpu", "kllama gpu eager", "kllama gpu"]  # no cap rows without a GPU
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0 for row in rows.values())
    assert rows["kllama auto"]["prefill_long_s"] > 0
    # same weights, greedy, same static-cache decoder: the CPU and GPU-target paths (both on the CPU here) agree
    assert rows["kllama cpu"]["generated_head"] == rows["kllama gpu"]["generated_head"]
    assert "decode tok/s" in decode_log and "expert ms" in decode_log


@pytest.fixture(scope="module")
def one_core_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Iterator[dict]:  # noqa: ANN001
    """The smoke runs that keep one core busy each (the two cpu_gemv probes, user_path.py, serve.py), started
    together when the first of their tests runs: on a 2-core CI machine they overlap instead of queueing (~12 s
    less). name -> (process, its output file, its work directory); each test waits for and checks its own."""
    work = tmp_path_factory.mktemp("one-core-runs")
    commands = {
        "gemv": ["cpu_gemv.py", "--threads", "1", "--experts", "8", "--hidden", "64", "--inter", "32", "--top-k", "2",
                 "--tokens", "1,4", "--repeats", "3", "--out", str(work / "gemv" / "gemv.json")],
        "kernel": ["cpu_gemv.py", "--kernel-only", "--threads", "1", "--hidden", "256", "--inter", "192", "--top-k",
                   "2", "--layers", "2", "--tokens", "1", "--repeats", "2",
                   "--out", str(work / "kernel" / "kernel.json")],
        # a variant source with the tree's text is the tree's library (no second build), timed interleaved with it,
        # each as host jobs on the kernel's own team (as a captured decode step runs them)
        "compare": ["cpu_gemv.py", "--kernel-only", "--threads", "1", "--hidden", "256", "--inter", "192",
                    "--top-k", "2", "--layers", "2", "--tokens", "1", "--repeats", "2", "--dtypes", "int8",
                    "--compare-source", str(_copy_of_kernel_source(work)), "--rounds", "3", "--team", "spin",
                    "--out", str(work / "compare" / "kernel.json")],
        # the kernel over decode's layout (a random top-k of a layer's experts, engine buffers) beside the cycled sets
        "routed": ["cpu_gemv.py", "--kernel-only", "--threads", "1", "--hidden", "256", "--inter", "192",
                   "--top-k", "2", "--layers", "2", "--tokens", "1", "--repeats", "2", "--dtypes", "int8",
                   "--routed", "4", "--rounds", "3", "--out", str(work / "routed" / "kernel.json")],
        "serve": ["serve.py", str(tiny_model_dir("deepseek_v2")), "--placements", "auto", "--concurrency", "1,4",
                  "--new", "6", "--out-dir", str(work / "serve" / "serve")],  # a server starts
        "interleave": ["decode.py", "--tiny", "--cpu-threads", "1", "--placements", "cpu", "--expert-dtype",
                       "int8,bf16", "--spare-core", "on,off", "--shared-overlap", "on,off", "--compile", "on",
                       "--interleave", "2",
                       "--new", "4",
                       "--out-dir", str(work / "interleave" / "results")],
    }
    runs = {}
    for name, (script, *args) in commands.items():
        (work / name).mkdir()
        runs[name] = (_start(script, *args, log=work / name / "log.txt"), work / name / "log.txt", work / name)
    # user_path.py drives the real CLI (`kllama train` in its own subprocess) and is run as a user runs it
    (work / "user_path").mkdir()
    user_path = [sys.executable, str(ROOT / "benchmarks" / "user_path.py"), "--tiny", "--work",
                 str(work / "user_path" / "work"), "--phases", "write,data,train,chat,api", "--pairs", "8",
                 "--max-tokens", "6", "--concurrency", "2",
                 "--pair-tokens", "60", "--set", "max_steps=2", "--set", "logging_steps=1",
                 "--set", "dataloader_num_workers=0", "--set", "per_device_train_batch_size=2",
                 "--set", "gradient_accumulation_steps=2", "--out-dir", str(work / "user_path" / "results")]
    log = work / "user_path" / "log.txt"
    runs["user_path"] = (_popen(user_path, log), log, work / "user_path")
    yield runs
    for proc, _, _ in runs.values():  # a test that failed before waiting for its run
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _copy_of_kernel_source(work: Path) -> Path:
    copy = work / "variant" / "same.cpp"
    copy.parent.mkdir()
    copy.write_text((ROOT / "src" / "kllama" / "experts" / "csrc" / "expert_pass.cpp").read_text())
    return copy


def test_cpu_gemv_kernel_only_compares_a_variant_source_interleaved(one_core_runs: dict) -> None:
    """`--compare-source` times another copy of the kernel's source beside the tree's, round by round, and gives its
    time as a multiple of the tree's (here the same library: near 1)."""
    proc, log_file, work = one_core_runs["compare"]
    log = _finish(proc, log=log_file)
    results = json.loads((work / "kernel.json").read_text())
    if results["kernel_isa"] in (None, "scalar"):
        pytest.skip("no kernel path above scalar on this CPU")
    isa = results["kernel_isa"]
    rows = {row["variant"]: row for row in results["rows"] if row.get("source")}  # every path; the best one here
    assert {f"kernel {isa} int8 [tree]", f"kernel {isa} int8 [same.cpp]"} <= set(rows), rows
    assert rows[f"kernel {isa} int8 [tree]"]["x_tree_time"] is None
    assert 0.2 < rows[f"kernel {isa} int8 [same.cpp]"]["x_tree_time"] < 5
    assert "median of the rounds' ratios" in log


def test_cpu_gemv_kernel_only_times_decodes_layout_beside_the_cycled_sets(one_core_runs: dict) -> None:
    """`--routed E` times the kernel over layers of E experts in the engine's host buffers, a random top-k a call,
    interleaved with the cycled sets, as a multiple of their time; the JSON says where the process's memory sits."""
    proc, log_file, work = one_core_runs["routed"]
    log = _finish(proc, log=log_file)
    results = json.loads((work / "kernel.json").read_text())
    assert "routed, a random 2 of 4 experts of the next of 2 layers" in log and "host memory of this process" in log
    if Path("/proc/self/numa_maps").exists():  # Linux with NUMA reporting: the GB the run holds, per node
        assert sum(results["process_gb_by_node"].values()) > 0, results["process_gb_by_node"]
    if Path("/sys/devices/system/node/node0").exists():
        assert "node0" in results["numa_nodes"], results["numa_nodes"]
    if results["kernel_isa"] in (None, "scalar"):
        pytest.skip("no kernel path above scalar on this CPU")
    isa = results["kernel_isa"]
    rows = {row["variant"]: row for row in results["rows"] if row.get("source")}
    assert rows[f"kernel {isa} int8 [cycled sets]"]["x_cycled_time"] is None
    assert 0.2 < rows[f"kernel {isa} int8 [routed over 4]"]["x_cycled_time"] < 5
    assert "time over the cycled sets, median of the rounds' ratios" in log


def test_cpu_gemv_routed_needs_top_k_experts_and_no_variant_source() -> None:
    for args, message in ((["--routed", "1"], "--routed 1 is fewer experts than --top-k 6"),
                          (["--routed", "8", "--compare-source", "old.cpp"], "run them apart")):
        proc = _start("cpu_gemv.py", "--kernel-only", *args)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in out and "Traceback" not in out, out


def test_cpu_gemv_probe_runs_small(one_core_runs: dict) -> None:
    proc, log_file, work = one_core_runs["gemv"]
    log = _finish(proc, log=log_file)
    out = work / "gemv.json"
    results = json.loads(out.read_text())
    rows = results["rows"]
    expected = {"read bandwidth (float32 sum)", "x @ W.T (bf16)", "torch layer pass, 1 token",
                "torch layer pass, 4 tokens"}
    if results["kernel_isa"] not in (None, "scalar"):  # the kernel's rows, on the best path this CPU runs
        isa = results["kernel_isa"]
        expected |= {f"kernel {isa} bf16, 1 token", f"kernel {isa} int8, 4 tokens"}
    assert {row["variant"] for row in rows} >= expected
    assert all(row["GB_per_s"] > 0 and row["pct_of_read"] > 0 for row in rows)
    assert "GB/s" in log


def test_cpu_gemv_kernel_only_rows_per_dtype_and_path(one_core_runs: dict) -> None:
    """`--kernel-only` times the C++ kernel alone: one row per thread count, dtype and instruction-set path."""
    proc, log_file, work = one_core_runs["kernel"]
    log = _finish(proc, log=log_file)
    out = work / "kernel.json"
    results = json.loads(out.read_text())
    variants = {row["variant"] for row in results["rows"]}
    assert "read bandwidth (float32 sum)" in variants
    if results["kernel_isa"] not in (None, "scalar"):
        isa = results["kernel_isa"]
        assert {f"kernel {isa} {dtype}" for dtype in ("bf16", "int8", "fp8")} <= variants
    assert all(row["GB_per_s"] > 0 for row in results["rows"])
    assert "GB/s" in log and "disjoint sets cycled" in log


def test_decode_interleaves_dtype_and_thread_variants_round_by_round(one_core_runs: dict) -> None:
    """`decode.py --interleave` keeps every dtype's model, decodes with each dtype x spare-core x shared-overlap
    variant in turn, and gives each variant's speed as a multiple of the bf16 variant of the same settings, round by round."""
    proc, log_file, work = one_core_runs["interleave"]
    log = _finish(proc, log=log_file)
    result = _only_json(work / "results")
    every = {(row["expert_dtype"], row["spare_core"], row["shared_overlap"]): row for row in result["rows"]}
    assert set(every) == {(d, s, o) for d in ("int8", "bf16") for s in (True, False) for o in (True, False)}
    assert every[("int8", True, False)]["base"] == every[("bf16", True, False)]["name"]
    # --compile on asks for compiled steps; a CPU model's steps run eagerly, so each row says nothing was compiled
    assert all(not row["compiled"] and row["compile_reason"] == "steps run eagerly" for row in every.values())
    assert "shared experts beside the CPU" in every[("int8", True, True)]["name"]
    rows = {(dtype, spare): row for (dtype, spare, shared), row in every.items() if shared}
    assert result["interleave_rounds"] == 2 and all(len(row["rounds_tokens_per_s"]) == 2 for row in rows.values())
    assert rows[("int8", False)]["base"] == rows[("bf16", False)]["name"]  # same settings, bf16 experts
    assert rows[("bf16", False)]["base"] == rows[("bf16", True)]["name"] and rows[("bf16", True)]["x_base"] == 1
    for row in every.values():
        assert row["decode_tokens_per_s"] > 0 and len(row["x_base_rounds"]) == 2
        assert row["x_base"] == statistics.median(row["x_base_rounds"]) > 0
    assert rows[("int8", True)]["generated_head"] and "round 2/2" in log and "x base" in log


def test_user_path_runs_the_cli_on_a_tiny_model(one_core_runs: dict) -> None:
    """benchmarks/user_path.py drives the real CLI (`kllama train` on the example YAML in a subprocess, then `kllama
    chat` and `kllama api` with the adapter it wrote) and records per-step tokens/s, the whole process tree's peak
    memory, chat's own speed line and the API's streams counted by the server's usage."""
    proc, log_file, work = one_core_runs["user_path"]
    _finish(proc, timeout=300, log=log_file)
    result = _only_json(work / "results")
    train = result["phases"]["train"]
    assert train["exit_code"] == 0 and train["peak_host_gb"] > 0 and train["peak_host_rss_sum_gb"] > 0
    assert [s["step"] for s in train["steps"]] == [1, 2] and all(s["tokens_per_second"] > 0 for s in train["steps"])
    # CPU: the experts run there, none stream, and the reference keeps its own pass
    assert train["promotions"] == [] and train["streamed_layers"] is None and train["lockstep_reference"] is False
    chat = result["phases"]["chat"]
    assert chat["exit_code"] == 0 and 1 <= chat["answer_tokens"] <= 6 and chat["prompt_tokens"] > 0
    assert chat["first_token_s"] > 0 and (chat["decode_tok_s"] > 0 or chat["answer_tokens"] == 1)
    assert chat["second_first_token_s"] > 0 and chat["second_prompt_tokens"] > chat["prompt_tokens"]  # a new length
    api = result["phases"]["api"]
    assert api["exit_code"] is not None and "failed" not in api.get("note", ""), api
    assert api["single_stream"]["completion_tokens"] == 6 and api["concurrent"]["completion_tokens"] == 12
    assert api["single_decode_tok_s"] > 0 and api["concurrent"]["aggregate_tok_s"] > 0
    assert len(api["new_lengths"]["ttft_s"]) == 4 and api["new_lengths"]["ttft_max_s"] > 0


def test_serve_benchmark_drives_a_real_server(one_core_runs: dict) -> None:
    proc, log_file, work = one_core_runs["serve"]
    log = _finish(proc, timeout=300, log=log_file)
    out_dir = work / "serve"
    result = _only_json(out_dir)
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"auto x1", "auto x4", "auto, 4 new prompt lengths"}, rows
    fresh = rows.pop("auto, 4 new prompt lengths")  # one request at a time, each prompt longer than any before
    assert len(fresh["ttft_s"]) == 4 and all(t > 0 for t in fresh["ttft_s"])
    assert fresh["ttft_p50_s"] <= fresh["ttft_p95_s"] == max(fresh["ttft_s"])
    for row in rows.values():
        assert row["aggregate_tok_s"] > 0 and row["completion_tokens"] == 6 * row["streams"], row
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] and row["itl_p50_ms"] > 0
        assert 0 < row["tpot_p50_ms"] <= row["tpot_p95_ms"], row
    assert rows["auto x1"]["max_batch"] == 1 and rows["auto x4"]["max_batch"] >= 2  # the server batched them
    assert "aggregate tok/s" in log and (out_dir / "serve_auto.log").is_file()


def test_dpo_ddp_runs_two_tiny_ranks_on_cpu(tmp_path: Path) -> None:
    out = _finish(_start("dpo_ddp.py", "--tiny", "--nproc", "2", "--baseline", "--out-dir", str(tmp_path)), timeout=240)
    assert "2 rank(s)" in out
    result = _only_json(tmp_path)
    assert result["ranks"] == 2
    rows = {row["name"]: row for row in result["rows"]}
    for name in ("kllama stream", "kllama gpu", "stock+peft DDP (chunked logps)"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["ranks"] == 2, rows[name]
        assert len(rows[name]["per_rank"]) == 2 and rows[name]["node_pss_gb"] > 0
    probe = result["copy_probe"]
    assert len(probe["alone_gb_s"]) == len(probe["together_gb_s"]) == 2 and probe["together_total_gb_s"] > 0


def test_user_path_finds_promotion_lines_after_a_step_bar() -> None:
    """The H200 run of 2026-11-30 logged the promotion right after tqdm's step bar on one line; the JSON said no
    promotion. Both shapes (own line, after a bar) count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from user_path import expert_layer_facts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    line = ("promoted 1 more layer after step 1: peak 21.6 GB allocated of 24.0 GB budget (...); "
            "19 of 26 MoE layers stream")
    start = "micro-batching: 1 x 8 accumulation -> (...; experts host-held: each pass has 20 streamed, 6 resident)\n"
    for log in (start + "  4%|4         | 1/24 [00:12<04:58, 12.97s/it]" + line + "\n",
                start + line + "\nsomething else\n"):
        facts = expert_layer_facts(log)
        assert facts["promotions"] == [line] and facts["streamed_layers"] == 19
        assert facts["streamed_layers_at_start"] == 20


def test_export_memory_benchmark_runs_both_merges_tiny(tmp_path: Path) -> None:
    """benchmarks/export_memory.py exports a tiny model + adapter streamed and in memory, in subprocesses, and the
    two exports agree (same names, values within bf16 rounding)."""
    out = _finish(_start("export_memory.py", "--tiny", "--work", str(tmp_path / "work"), "--out-dir",
                         str(tmp_path / "results")), timeout=240)
    rows = {row["mode"]: row for row in _only_json(tmp_path / "results")["rows"]}
    assert set(rows) == {"streamed", "in-memory"} and all(r["exit_code"] == 0 and r["peak_host_gb"] > 0
                                                         for r in rows.values())
    difference = float(rows["streamed"]["note"].split("largest relative difference ")[1].split()[0])
    assert rows["streamed"]["note"].startswith("same ") and difference < 1e-2, rows["streamed"]["note"]
    assert "peak host GB" in out


def test_host_pages_benchmark_times_both_page_kinds_tiny(tmp_path: Path) -> None:
    """benchmarks/host_pages.py fills buffers and runs the kernel over weights in 4 KiB pages and in huge pages,
    interleaved, and reports each huge-page row as a multiple of its small-page row."""
    out = _finish(_start("host_pages.py", "--gb", "0.024", "--chunk-gb", "0.004", "--rounds", "2", "--threads", "1",
                         "--dtypes", "int8", "--layers", "2", "--top-k", "2", "--hidden", "256", "--inter", "192",
                         "--repeats", "2", "--out-dir", str(tmp_path)))
    result = _only_json(tmp_path)
    rows = {(row["row"].split(",")[0], row["pages"]): row for row in result["rows"]}
    fills = [key for key in rows if key[0].startswith("fill")]
    assert sorted(page for _, page in fills) == ["2 MiB", "4 KiB"]
    assert all(rows[key]["value"] > 0 for key in fills)
    assert rows[(fills[0][0], "4 KiB")]["x_small_pages"] is None
    assert rows[(fills[0][0], "2 MiB")]["x_small_pages"] > 0
    if ("kernel int8", "2 MiB") in rows:  # the C++ kernel built on this machine
        assert rows[("kernel int8", "4 KiB")]["value"] > 0 and rows[("kernel int8", "2 MiB")]["x_small_pages"] > 0
    assert "x 4 KiB" in out and "huge pages GB" in out
