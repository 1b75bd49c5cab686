"""Shared helpers of the benchmark scripts: full-size random models, timing probes, memory, table and JSON output.

Models are built the fast way (no checkpoint, no download): the transformers model class on the meta device, routed
experts swapped for `HostExperts` with bf16 host tensors (pinned when CUDA exists) or, for the stock baseline, left
as stock parameters on the GPU; every other module materialised directly on the compute device and filled with
normal(0, 0.02) (norms 1, biases 0). Random weights give realistic timings: GEMM time does not depend on values and
a random router spreads tokens roughly evenly over experts, as a load-balanced trained model does.

Nothing here imports `kllama.data` (it needs `datasets`, absent on the GPU box).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

from kllama.experts.families import find_expert_modules
from kllama.experts.module import HostExperts
from kllama.experts.shared_host import expert_host_buffer
from kllama.experts.placement import ExpertPlacement
from kllama.experts.quant import QUANT_DTYPES, ExpertWeight, QuantizedWeight, quantize, scale_shape, values_shape
from kllama.model.fused_norm import fuse_rms_norms
from kllama.model.load import compute_device  # noqa: F401 - the one device choice, re-exported for the scripts

INIT_STD = 0.02
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_T0 = time.perf_counter()

# Real configs of the benchmarked models (values from their hub config.json files), as transformers config fields.
# The special-token ids are left to `tiny_config`: the written models ship kllama's small tokenizer, and a config
# naming the real ids (100000/100001, 151643/151645) would disagree with it (transformers' Trainer warned of it).
FULL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "v2lite": ("deepseek_v2", {
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }),
    "qwen3-235b": ("qwen3_moe", {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False,
    }),
    "qwen3-30b": ("qwen3_moe", {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False,
    }),
}

# --tiny: the same families shrunk so the CPU smoke test runs in seconds.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "v2lite": {"num_hidden_layers": 3},
    "qwen3-30b": {"num_hidden_layers": 2},
    "qwen3-235b": {"num_hidden_layers": 2},
}


PLACEMENTS = ("stream", "auto", "gpu", "cpu")


def comma_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated option value, stripped."""
    return [item.strip() for item in text.split(",") if item.strip()]


# `--expert-dtype` values: bf16 (not quantized) and every quantized scheme
BENCH_EXPERT_DTYPES: tuple[str, ...] = ("bf16", *QUANT_DTYPES)


def expert_dtype_list(text: str) -> list[str]:
    """An `--expert-dtype` value as a list; an empty list or an unknown name ends the script with one line naming the
    choices."""
    dtypes = comma_list(text)
    if not dtypes or any(d not in BENCH_EXPERT_DTYPES for d in dtypes):
        raise SystemExit(f"--expert-dtype {text!r}: a comma list of {', '.join(BENCH_EXPERT_DTYPES)}")
    return dtypes


def placement_list(text: str) -> list[str]:
    """A `--placements` value as a list; an unknown name ends the script with one line naming the choices."""
    placements = comma_list(text)
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise SystemExit(f"unknown placements {unknown}; choose from {', '.join(PLACEMENTS)}")
    return placements


def log(message: str) -> None:
    """Print a progress line with wall time since start, flushed (a run killed at the time limit still shows it)."""
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp} +{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def model_config(model: str, *, tiny: bool, layers: int | None) -> PretrainedConfig:
    """The transformers config of benchmark model `model` (`v2lite | qwen3-30b`): full size, or tiny for smoke tests;
    `layers` keeps only the first N decoder layers (time-limited runs)."""
    arch, fields = FULL_SHAPES[model]
    if tiny:
        from kllama.model.tiny import tiny_config

        config = tiny_config(arch, **TINY_OVERRIDES[model])
    else:
        config = CONFIG_MAPPING[arch](**fields)
    if layers is not None:
        config.num_hidden_layers = min(layers, config.num_hidden_layers)
    return config


def shape_summary(config: PretrainedConfig) -> dict[str, Any]:
    """The config fields that decide the cost of a step (for the JSON)."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "moe_intermediate_size", "intermediate_size", "n_routed_experts", "num_experts",
            "num_experts_per_tok", "first_k_dense_replace", "kv_lora_rank")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


@torch.no_grad()
def _fill_(param: torch.Tensor, name: str) -> None:
    if param.dim() == 1 and "norm" in name:
        param.fill_(1.0)
    elif name.endswith("bias"):
        param.zero_()
    else:
        param.normal_(0.0, INIT_STD)


def _meta_buffer_owners(model: nn.Module) -> list[nn.Module]:
    owners = {}
    for name, buf in model.named_buffers():
        if buf is not None and buf.is_meta:
            owner = name.rpartition(".")[0]
            owners[owner] = model.get_submodule(owner)
    return list(owners.values())


def _host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, bool]:
    numel = 1
    for dim in shape:
        numel *= dim
    # exact-size pinning, as the loader does; inside `node_shared_experts` one copy per node (local rank 0 fills)
    flat, filled = expert_host_buffer(numel, dtype, pin=pin)
    return flat.view(shape), filled


@torch.no_grad()
def _random_host_experts(stock: nn.Module, name: str, placement: ExpertPlacement, device: torch.device,
                         scratch: dict[tuple, torch.Tensor], expert_dtype: str = "bf16") -> HostExperts:
    """A HostExperts of `stock`'s shape with random bf16 weights, held as `expert_dtype` (bf16 | int8 | int4 | fp8): drawn
    (and quantized) on the GPU and copied into pinned host memory, or drawn on the CPU without CUDA. A quantized
    layer never exists in bf16 on the host, as with the loader."""
    shapes = (tuple(stock.gate_up_proj.shape), tuple(stock.down_proj.shape))  # meta shapes
    pin = device.type == "cuda"
    host: list[ExpertWeight] = []
    for shape, projections in zip(shapes, (2, 1)):
        work = device if pin else torch.device("cpu")
        if shape not in scratch:
            scratch[shape] = torch.empty(shape, dtype=torch.bfloat16, device=work)
        if expert_dtype not in QUANT_DTYPES:
            tensor, filled = _host_buffer(shape, torch.bfloat16, pin)
            if not filled:
                tensor.copy_(scratch[shape].normal_(0.0, INIT_STD))
            host.append(tensor)
            continue
        data, filled = _host_buffer(values_shape(expert_dtype, shape), QUANT_DTYPES[expert_dtype], pin)
        scale, _ = _host_buffer(scale_shape(expert_dtype, shape, projections), torch.float32, pin)
        if not filled:
            drawn = quantize(scratch[shape].normal_(0.0, INIT_STD), expert_dtype, projections=projections)
            data.copy_(drawn.data)
            scale.copy_(drawn.scale)
            del drawn
        host.append(QuantizedWeight(data, scale, torch.bfloat16, projections))
    return HostExperts(host[0], host[1], stock.act_fn, placement, name, compute_device=device)


def build_model(config: PretrainedConfig, device: torch.device, *, host_experts: bool,
                placement: ExpertPlacement | None = None, expert_dtype: str = "bf16",
                fused_norms: bool | None = None) -> tuple[nn.Module, dict[str, HostExperts]]:
    """A random bf16 causal LM for `config`: non-expert weights on `device`; routed experts as HostExperts in host
    memory (`host_experts=True`, with `placement`, held as `expert_dtype`: bf16 | int8 | int4 | fp8) or as stock
    parameters on `device` (the stock baseline). RMSNorms fused as `kllama.model.load` fuses them when
    `fused_norms` (default: for the kllama build, not the stock one). Returns the model (train mode off) and the
    HostExperts by qualified name (empty for stock)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    modules: dict[str, HostExperts] = {}
    if host_experts:
        scratch: dict[tuple, torch.Tensor] = {}
        for name, stock in find_expert_modules(model).items():
            modules[name] = _random_host_experts(stock, name, placement or ExpertPlacement.from_mode("stream"),
                                                 device, scratch, expert_dtype)
            model.set_submodule(name, modules[name])
        scratch.clear()
    owners = _meta_buffer_owners(model)
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        _fill_(param, name)
    for owner in owners:  # rotary inv_freq & co: let the model class compute them, as from_pretrained does
        model._init_weights(owner)
    if host_experts if fused_norms is None else fused_norms:
        fuse_rms_norms(model)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, modules


def release(*objects: Any) -> None:
    """Drop references (callers `del` theirs) and return cached GPU memory, so the next run starts clean."""
    import gc

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- memory
def peak_host_gb() -> float:
    """Peak resident set size of this process so far (GB); monotone over the run."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_host_gb() -> float:
    """Resident set size now (GB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


NODES_DIR = Path("/sys/devices/system/node")


def numa_nodes() -> dict[str, dict[str, Any]]:
    """The host's NUMA nodes (Linux sysfs): each node's CPUs and memory (GB); {} where sysfs has none. A CPU pass's
    weights on another node than its threads are read across the socket link, slower than local memory."""
    nodes: dict[str, dict[str, Any]] = {}
    for node in sorted(NODES_DIR.glob("node[0-9]*")):
        meminfo = {line.split()[2].rstrip(":"): int(line.split()[3]) for line in
                   (node / "meminfo").read_text().splitlines() if len(line.split()) >= 4}
        nodes[node.name] = {"cpus": (node / "cpulist").read_text().strip(),
                            "total_gb": meminfo.get("MemTotal", 0) * 1024 / 1e9,
                            "used_gb": meminfo.get("MemUsed", 0) * 1024 / 1e9}
    return nodes


def process_gb_by_node() -> dict[str, float]:
    """GB of this process's memory on each NUMA node now (`/proc/self/numa_maps`: pages per node of every mapping,
    in the mapping's page size, huge pages included); {} where the kernel does not report it."""
    maps = Path("/proc/self/numa_maps")
    try:
        text = maps.read_text()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)
        page_kb = int(fields.get("kernelpagesize_kB", "4"))
        for key, value in fields.items():
            if key[:1] == "N" and key[1:].isdigit():
                totals[f"node{key[1:]}"] = totals.get(f"node{key[1:]}", 0.0) + int(value) * page_kb * 1024 / 1e9
    return dict(sorted(totals.items()))


def node_split_text(by_node: dict[str, float]) -> str:
    """`by_node` as a log fragment (empty on a one-node host: nothing to tell)."""
    if len(by_node) < 2:
        return ""
    return "; by NUMA node: " + ", ".join(f"{node} {gb:.1f} GB" for node, gb in by_node.items())


def set_gpu_cap(cap_gb: float | None, device: torch.device) -> None:
    """Cap this process's GPU memory at `cap_gb` (None = the whole card), as `max_gpu_memory` does."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gb is None else min(1.0, cap_gb * 1e9 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device.index if device.index is not None else torch.cuda.current_device())


def reset_gpu_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (GB), None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- expert timing probes
@dataclass
class ExpertTimes:
    """Seconds spent in routed-expert passes and waiting for streamed copies, accumulated over marked steps."""

    expert_s: float = 0.0  # executor time, copy waits excluded
    copy_wait_s: float = 0.0
    passes: int = 0
    _pending: list[tuple[Any, Any, str]] = field(default_factory=list)  # (start, end, kind) CUDA events or floats
    recording: bool = False

    def collect(self) -> None:
        """Read the recorded events (after a synchronize) into the totals."""
        for start, end, kind in self._pending:
            seconds = (end - start) if isinstance(start, float) else start.elapsed_time(end) / 1000
            if kind == "wait":
                self.copy_wait_s += seconds
            else:
                self.expert_s += seconds
                self.passes += 1
        self._pending.clear()

    def reset(self) -> None:
        self.expert_s, self.copy_wait_s, self.passes = 0.0, 0.0, 0
        self._pending.clear()


def _cuda_mark(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class _TimedExecutor:
    """Wraps an expert executor: times each forward/backward (CUDA events on the compute stream for device
    executors, wall time after a synchronize for the CPU one)."""

    def __init__(self, inner: Any, times: ExpertTimes, on_cpu: bool) -> None:
        self.inner, self.times, self.on_cpu = inner, times, on_cpu

    def _timed(self, fn: Callable, module: HostExperts, *args: Any) -> Any:
        if not self.times.recording:
            return fn(module, *args)
        device = module.compute_device
        if self.on_cpu or device.type != "cuda":
            synchronize(device)
            start = time.perf_counter()
            result = fn(module, *args)
            self.times._pending.append((start, time.perf_counter(), "expert"))
            return result
        start = _cuda_mark(device)
        result = fn(module, *args)
        self.times._pending.append((start, _cuda_mark(device), "expert"))
        return result

    def forward(self, module, *args):  # noqa: ANN001, ANN002, ANN201
        return self._timed(self.inner.forward, module, *args)

    def backward(self, module, *args):  # noqa: ANN001, ANN002, ANN201
        return self._timed(self.inner.backward, module, *args)


@contextmanager
def expert_timing(times: ExpertTimes) -> Iterator[None]:
    """Time every routed-expert pass while inside the block (when `times.recording`).

    The engine has no public per-pass timing hook, so this wraps the executors it dispatches through
    (`kllama.experts.module._EXECUTORS`) and restores them on exit."""
    from kllama.experts import module as engine_module

    saved = dict(engine_module._EXECUTORS)
    for target, executor in saved.items():
        engine_module._EXECUTORS[target] = _TimedExecutor(executor, times, on_cpu=target == "cpu")
    try:
        yield
    finally:
        engine_module._EXECUTORS.clear()
        engine_module._EXECUTORS.update(saved)


def probe_copy_waits(streamer: Any, times: ExpertTimes) -> None:
    """Measure how long the compute stream waits for streamed weights: an event recorded just before the streamer
    makes the compute stream wait for the copy, and the trace's compute-start event recorded right after, bracket
    exactly that wait on the GPU timeline. Needs a streamer built with `trace=True`."""
    if streamer is None or not streamer.trace:
        return
    original = streamer.acquire

    def acquire(module: HostExperts, num_tokens: int, backward: bool, *rest: Any):  # noqa: ANN202
        if not times.recording:
            return original(module, num_tokens, backward, *rest)
        before = _cuda_mark(streamer.device)
        weights = original(module, num_tokens, backward, *rest)
        layer = streamer._index[id(module)]  # the trace keeps this pass's compute-start event under its layer
        start = streamer._open.get(layer)
        if start is not None:
            times._pending.append((before, start, "wait"))
        return weights

    streamer.acquire = acquire


def split_expert_time(times: ExpertTimes) -> tuple[float, float]:
    """(expert compute s, copy wait s): executor intervals include the copy wait, so subtract it."""
    return max(0.0, times.expert_s - times.copy_wait_s), times.copy_wait_s


# ----------------------------------------------------------------------------- output
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "run", "{}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("s_per_step", "s/step", "{:.3f}"),
    ("peak_gpu_gb", "peak GPU GB", "{:.1f}"),
    ("peak_host_gb", "peak host GB", "{:.1f}"),
    ("expert_s", "expert s", "{:.3f}"),
    ("copy_wait_s", "copy wait s", "{:.3f}"),
    ("rest_s", "rest s", "{:.3f}"),
    ("note", "note", "{}"),
)


def format_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> str:
    """A plain-text table of `rows` (missing or None cells print as `-`)."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    cells = [[title for _, title, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and hardware the numbers came from."""
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "numa_nodes": numa_nodes(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1))
    return env


def write_results(result: dict[str, Any], stem: str, out_dir: Path | None = None) -> Path:
    """Write `result` as `<out_dir>/<stem>_<date>.json` (default benchmarks/results/) and copy it to `$OUT` when set
    (the GPU box sends back what is there)."""
    return write_result_file(f"{stem}_{_dt.date.today().isoformat()}.json",
                             json.dumps(result, indent=2, default=str) + "\n", out_dir)


def write_result_file(name: str, text: str, out_dir: Path | None = None) -> Path:
    """Write `text` as `<out_dir>/<name>` (default benchmarks/results/) and copy it to `$OUT` when set."""
    target = Path(out_dir) if out_dir is not None else RESULTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    path.write_text(text)
    copy = Path(os.environ["OUT"]) / path.name if os.environ.get("OUT") else None
    if copy is not None and copy.resolve() != path.resolve():
        shutil.copy(path, copy)
    return path
