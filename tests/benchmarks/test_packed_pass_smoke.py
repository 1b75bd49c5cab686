"""benchmarks/packed_pass.py (issue 11's probe: padded vs packed DPO micro-steps through kllama's trainer) runs end to
end on a tiny CPU model, as the lead runs it on the GPU box."""
from __future__ import annotations

from pathlib import Path

from test_bench_smoke import _finish, _only_json, _start


def test_packed_pass_probe_runs_tiny_on_cpu(tmp_path: Path) -> None:
    log = _finish(_start("packed_pass.py", "--tiny", "--layers", "2", "--modes", "padded,packed,packed-cudnn", "--warmup", "0",
                         "--repeats", "1", "--out-dir", str(tmp_path)))
    result = _only_json(tmp_path)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["padded", "packed", "packed-cudnn"], rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["s_per_step"] > 0 and row["placement"] == "stream" and row["lockstep"], row
        assert row["host_reads"] > 0 and row["profile"]["self_cpu"], row
    padded, packed = rows["padded"], rows["packed"]
    # the same pairs: packed is their real tokens in one row, padded the same tokens right-padded to a multiple of 8
    assert packed["pass_shape"] == [1, packed["real_tokens"]] and packed["real_tokens"] == padded["real_tokens"]
    sequences, length = padded["pass_shape"]
    assert sequences == 2 * result["pairs"] and length % 8 == 0 and padded["pass_tokens"] > padded["real_tokens"]
    # ... and the trainer computed the same log-probs from both layouts (bf16 model)
    for key in ("logps_chosen", "logps_rejected"):
        assert abs(padded[key] - packed[key]) <= 0.02 * abs(padded[key]), (key, padded[key], packed[key])
        assert rows["packed-cudnn"][key] == packed[key]  # the pre-fix kernels' mode (no cuDNN on a CPU): same step
    # the packed path's own host read: the sequence count of the packed row in the log-prob reduction
    assert any("kllama/train/logprobs.py" in site for site in packed["host_read_sites"]), packed["host_read_sites"]
    assert "s/step (median)" in log and "top" in log and "self CPU time" in log
