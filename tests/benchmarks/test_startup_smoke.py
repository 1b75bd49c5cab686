"""`benchmarks/startup.py` (the start-up crossover measurement, piece by piece) runs on the tiny config: on the CPU
the CPU side only, with CUDA the whole measurement (on the layer's weights, and with a built probe layer)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PIECES = ("probe layer", "copy probe", "cpu kernel", "inference", "training", "split")


def test_startup_probe_times_each_piece_on_a_tiny_layer(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)  # the scripts copy their JSON to $OUT (the GPU box's result folder)
    main = runpy.run_path(str(ROOT / "benchmarks" / "startup.py"))["main"]
    result = main(["--tiny", "--cpu-threads", "1", "--out-dir", str(tmp_path)])
    assert [path.name.split("_2")[0] for path in tmp_path.glob("*.json")] == ["startup_v2lite_tiny_bf16"]
    assert result["kernel"]["kernel_status_s"] >= 0
    cuda = torch.cuda.is_available()
    runs = result["measurements"]
    assert len(runs) == (3 if cuda else 2)  # CUDA: twice on the layer's weights, once with a probe layer
    for found in runs.values():
        names = list(found["phases"])
        assert names == [piece for piece in PIECES if piece in names]  # in the order they run
        assert {"cpu kernel", "inference", "training", "split"} <= set(names)
        assert ("copy probe" in names) == cuda
        assert found["total_s"] == sum(found["phases"].values())
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("measurement"))
    assert "crossovers measured in" in out
    assert header.split()[-5:] == ["kernel", "inference", "training", "split", "total"]  # the pieces in run order
