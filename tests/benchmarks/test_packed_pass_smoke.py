"""benchmarks/packed_pass.py (issue 11's probe: padded vs packed DPO micro-steps through kllama's trainer) runs end to
end on a tiny CPU model, as the lead runs it on the GPU box, at two layer counts with the per layer / fixed split."""
from __future__ import annotations

import math
from pathlib import Path

from test_bench_smoke import ROOT, _finish, _only_json, _start


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_packed_pass_probe_runs_tiny_on_cpu_at_two_layer_counts(tmp_path: Path) -> None:
    log = _finish(_start("packed_pass.py", "--tiny", "--layers", "3,2", "--modes", "padded,packed,packed-shared", "--warmup", "0",
                         "--repeats", "1", "--budget-s", "900", "--out-dir", str(tmp_path)))
    # (the budget far above the run: under a parallel suite on the H200 box the default 75 s ran out mid-run, and
    # the rows past it carry no sync count or profile by design)
    result = _only_json(tmp_path)
    assert result["layers"] == [2, 3] and result["full_layers"] == 3 and result["warmed_step_shapes"], result["layers"]
    rows = {(row["name"], row["layers"]): row for row in result["rows"]}
    assert list(rows) == [(name, layers) for layers in (2, 3) for name in ("padded", "packed", "packed-shared")], \
        list(rows)  # smallest count first
    for row in rows.values():
        assert "error" not in row, row
        assert row["s_per_step"] > 0 and row["placement"] == "stream" and row["lockstep"], row
        assert row["streamed_layers"] == row["layers"] - 1 and row["warmed_step_shapes"], row  # layer 0 is dense
        assert row["host_reads"] > 0 and row["profile"]["self_cpu"] and row["profile"]["ops_metric"] == "self CPU"
    for layers in (2, 3):
        padded, packed = rows[("padded", layers)], rows[("packed", layers)]
        # the same pairs: packed is their real tokens in one row, padded the same tokens right-padded to a multiple
        # of 8 ...
        assert packed["pass_shape"] == [1, packed["real_tokens"]] and packed["real_tokens"] == padded["real_tokens"]
        sequences, length = padded["pass_shape"]
        assert sequences == 2 * result["pairs"] and length % 8 == 0 and padded["pass_tokens"] > padded["real_tokens"]
        # ... and the trainer computed the same log-probs from both layouts (bf16 model)
        for key in ("logps_chosen", "logps_rejected"):
            assert abs(padded[key] - packed[key]) <= 0.02 * abs(padded[key]), (key, padded[key], packed[key])
        # the packed path's own host read: the sequence count of the packed row in the log-prob reduction
        assert any("kllama/train/logprobs.py" in site for site in packed["host_read_sites"]), packed["host_read_sites"]
        # prefix sharing: the same pairs in fewer computed tokens (each prompt once), the same log-probs, and the
        # tokens the data holds counted as before
        shared = rows[("packed-shared", layers)]
        assert shared["real_tokens"] < packed["real_tokens"] == shared["data_tokens"] == packed["data_tokens"]
        for key in ("logps_chosen", "logps_rejected"):
            assert abs(shared[key] - packed[key]) <= 0.02 * abs(packed[key]), (key, shared[key], packed[key])
    # every layer count ran the same pairs: the same tokens
    assert rows[("packed", 2)]["real_tokens"] == rows[("packed", 3)]["real_tokens"]

    splits = {split["name"]: split for split in result["split"]}
    assert list(splits) == ["padded", "packed", "packed-shared"], list(splits)
    for name, split in splits.items():
        assert split["layers"] == split["profiled_layers"] == [2, 3] and split["full_layers"] == 3
        assert split["step"]["measured_ms"] == [1e3 * rows[(name, n)]["s_per_step"] for n in (2, 3)]
        assert split["ops"] and split["classes"]
        # a two-point fit goes through both points: fixed + per_layer * n is each measured count; projected at 3
        for entry in [split["step"], split["total"], *split["classes"], *split["ops"]]:
            for n, measured in zip((2, 3), entry["measured_ms"]):
                assert _close(entry["fixed_ms"] + entry["per_layer_ms"] * n, measured), entry
            assert _close(entry["projected_ms"], entry["fixed_ms"] + entry["per_layer_ms"] * 3), entry
            assert entry["max_residual_ms"] < 1e-9, entry
        # each count's ops are the row's profiled ops (absent: 0 ms); classes partition them; sorted by per layer
        for i, n in enumerate((2, 3)):
            row_ops = {op["name"]: op["ms"] for op in rows[(name, n)]["profile"]["ops"]}
            assert {op["name"]: op["measured_ms"][i] for op in split["ops"] if op["measured_ms"][i]} == row_ops
            assert _close(split["total"]["measured_ms"][i], sum(row_ops.values()))
            assert _close(sum(c["measured_ms"][i] for c in split["classes"]), split["total"]["measured_ms"][i])
        assert {op["class"] for op in split["ops"]} == {c["name"] for c in split["classes"]}
        assert {"GEMM", "elementwise"} <= {c["name"] for c in split["classes"]}
        per_layer = [op["per_layer_ms"] for op in split["ops"]]
        assert per_layer == sorted(per_layer, reverse=True)
    assert "s/step (median)" in log and "self CPU time" in log and "per layer / fixed" in log
    assert log.count("3 (projected)") == 3 and "-- by class (self CPU" in log


def test_packed_cudnn_mode_puts_cudnn_first_and_restores_the_packed_backends() -> None:
    """`packed-cudnn` (the pre-fix path; the smoke run above leaves it out to stay fast) lets the per-sequence calls
    use cuDNN's kernel inside the mode only."""
    import sys

    import torch
    from torch.nn.attention import SDPBackend

    folder = str(ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        from packed_pass import MODES, mode_context
    finally:
        while folder in sys.path:  # the script adds its folder too
            sys.path.remove(folder)

    from kllama.train import packing

    before = packing.PACKED_BACKENDS
    assert SDPBackend.CUDNN_ATTENTION not in before
    with mode_context(MODES["packed-cudnn"], torch.device("cpu")):
        assert packing.PACKED_BACKENDS == [SDPBackend.CUDNN_ATTENTION, *before]
    assert packing.PACKED_BACKENDS is before
