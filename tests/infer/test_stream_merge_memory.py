"""The streamed export's host memory is bounded by a shard, not by the model: the in-memory export's is not."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from kllama.model.tiny import write_random_adapter, write_tiny_model

SHARD_BYTES = 24 * 2**20

# One process exports a tiny model of the same family first (lazy imports, tokenizer and model-class modules), then
# resets the peak resident size (Linux clear_refs) and exports the measured model; peak - resident before is what the
# export itself needed. MALLOC_MMAP_THRESHOLD_ (see tests/model/test_quant_memory.py) keeps freed large blocks from
# staying resident in the heap, so the peak follows live bytes.
_MEASURE = textwrap.dedent("""
    import gc, json, sys
    from kllama.cli import main

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    warm_model, model, adapter, out, mode = sys.argv[1:6]
    if mode == "memory":
        import kllama.infer.export as export
        from kllama.infer.adapter_deltas import CannotStream

        def refuse(*args, **kwargs):
            raise CannotStream("measuring the in-memory merge")
        export.plan_merge = refuse
    args = ["infer_dtype=auto", "template=qwen3"]
    main(["export", f"model_name_or_path={warm_model}", f"export_dir={out}-warm", *args])
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    main(["export", f"model_name_or_path={model}", f"adapter_name_or_path={adapter}", f"export_dir={out}", *args])
    print(json.dumps({"peak": status("VmHWM") - before}))
""")


def _measure(tmp_path: Path, warm: Path, model: Path, adapter: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(warm), str(model), str(adapter),
                          str(tmp_path / f"out-{mode}"), mode], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072",
                              "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_export_peaks_under_two_shards(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import LoraConfig

    single = write_tiny_model(tmp_path / "single", "qwen3_moe", dtype=torch.bfloat16, hidden_size=512,
                              num_hidden_layers=6, num_experts=16, moe_intermediate_size=512)
    model = tmp_path / "sharded"
    model.mkdir()
    save_torch_state_dict(load_file(str(single / "model.safetensors")), str(model), max_shard_size=SHARD_BYTES)
    for path in single.iterdir():
        if not path.name.startswith("model."):
            (model / path.name).write_bytes(path.read_bytes())
    checkpoint = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert checkpoint > 5 * SHARD_BYTES and len(list(model.glob("*.safetensors"))) >= 6
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    write_random_adapter(model, tmp_path / "adapter", config)
    warm = tiny_model_dir("qwen3_moe")
    streamed = _measure(tmp_path, warm, model, tmp_path / "adapter", "streamed")
    in_memory = _measure(tmp_path, warm, model, tmp_path / "adapter", "memory")
    print(f"checkpoint {checkpoint / 2**20:.0f} MiB, shard {SHARD_BYTES / 2**20:.0f} MiB: peak RSS growth streamed "
          f"{streamed / 2**20:.0f} MiB, in memory {in_memory / 2**20:.0f} MiB")
    assert streamed < 2 * SHARD_BYTES, (streamed, in_memory)
    assert in_memory > checkpoint  # the bound is one the in-memory merge cannot meet
