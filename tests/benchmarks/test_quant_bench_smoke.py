"""The quantized-expert benchmark paths run end to end on tiny CPU models (`--expert-dtype`, `--layers` projection,
`quant_quality.py`), as the lead runs them on the GPU box."""
from __future__ import annotations

from pathlib import Path

from test_bench_smoke import _finish, _only_json, _start


def test_quantized_benchmark_rows_run_tiny_on_cpu(tmp_path: Path) -> None:
    dpo = _start("dpo_throughput.py", "--tiny", "--model", "qwen3-235b", "--layers", "1", "--placements", "stream",
                 "--expert-dtype", "bf16,fp8,int8,int4", "--no-kt", "--no-probe", "--out-dir", str(tmp_path / "dpo"))
    decode = _start("decode.py", "--tiny", "--cpu-threads", "1", "--placements", "cpu", "--expert-dtype", "int8,int4",
                    "--long-prompt", "0", "--out-dir", str(tmp_path / "decode"))
    quality = _start("quant_quality.py", "--model", "v2lite", "--tiny", "--rows", "2", "--seq", "24",
                     "--out-dir", str(tmp_path / "quality"))
    _finish(dpo), _finish(decode)
    quality_log = _finish(quality)

    result = _only_json(tmp_path / "dpo")
    rows = {row["name"]: row for row in result["rows"]}
    dtypes = ("bf16", "fp8", "int8", "int4")
    assert list(rows) == [f"kllama stream, {dtype}" for dtype in dtypes], rows
    for dtype, row in zip(dtypes, rows.values()):
        assert row["tokens_per_s"] > 0 and row["expert_dtype"] == dtype
        assert row["projected_layers"] == 2 and row["projected_tokens_per_s"] == row["tokens_per_s"] / 2
        assert row["s_per_layer"] == row["s_per_step"]  # one of two layers
    builds = result["builds"]
    assert builds["fp8"]["expert_host_gb"] < 0.55 * builds["bf16"]["expert_host_gb"]
    assert builds["fp8"]["expert_bf16_gb"] == builds["bf16"]["expert_host_gb"]
    assert builds["int4"]["expert_host_gb"] < 0.32 * builds["bf16"]["expert_host_gb"]

    decoded = _only_json(tmp_path / "decode")
    assert [row["name"] for row in decoded["rows"]] == ["kllama cpu (1 threads, graphs), int8",
                                                        "kllama cpu (1 threads, graphs), int4"]
    assert all(row["decode_tokens_per_s"] > 0 for row in decoded["rows"])

    quality = _only_json(tmp_path / "quality")
    by_name = {row["name"]: row for row in quality["rows"]}
    assert set(by_name) == {"bf16", "fp8", "int8", "int4"}
    # the same weights quantized: small but non-zero changes, int8 finer than fp8, int4 (15 levels) coarsest
    # (measured on this tiny shape: 1.1 % int8, 4.5 % fp8, 18 % int4)
    errors = [by_name[scheme]["expert_rel_err_mean"] for scheme in ("int8", "fp8", "int4")]
    assert 0 < errors[0] < errors[1] < 0.1 and errors[1] < errors[2] < 0.3
    assert 0 < by_name["fp8"]["logp_abs_diff_mean"] < 0.05
    assert "|dlogp| mean" in quality_log
