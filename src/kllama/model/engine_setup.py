"""Put a checkpoint on the expert engine as a config asks: placements per layer, the GPU budget, the start-up table."""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from kllama.config import KllamaConfig, parse_bytes
from kllama.config.checks import resolve_config_path
from kllama.config.kt_keys import cpu_threads, engine_notices
from kllama.errors import KllamaError
from kllama.experts.install import ExpertEngine
from kllama.experts.module import HostExperts
from kllama.experts.placement import ExpertPlacement
from kllama.experts.quant import QUANT_DTYPES
from kllama.experts.report import placement_table
from kllama.model.meta_load import load_checkpoint
from kllama.model.source import ModelSource


def placement_chooser(config: KllamaConfig, device: torch.device, notes: list[str] | None = None,
                      ) -> Callable[[list[str]], dict[str, ExpertPlacement]]:
    """A function mapping the model's routed-expert module names to placements: from `kt_optimize_rule` when given
    (its translation notes appended to `notes`; an explicit `expert_placement: cpu` keeps a KTransformers CPU
    entry's training on the CPU), else `expert_placement`; on a CPU device everything runs on the CPU."""
    engine = config.engine
    cpu_training = "expert_placement" in config.given and engine.expert_placement == "cpu"
    threads, _ = cpu_threads(config)  # cpu_infer (or kt_config.kt_num_threads), at most the usable CPUs

    def choose(names: list[str]) -> dict[str, ExpertPlacement]:
        if engine.kt_optimize_rule:
            from kllama.experts.rules import load_rule_file

            path = resolve_config_path(engine.kt_optimize_rule, config)
            if path is None:
                raise KllamaError(f"kt_optimize_rule: file {engine.kt_optimize_rule!r} not found")
            report = load_rule_file(path)
            placements = report.resolve(names, cpu_threads=threads, chunk_size=engine.chunk_size,
                                        default_mode=engine.expert_placement, cpu_training=cpu_training)
            if notes is not None:
                notes.extend(f"{path.name}: {note}" for note in report.notes)
        else:
            base = ExpertPlacement.from_mode(engine.expert_placement, cpu_threads=threads,
                                             chunk_size=engine.chunk_size, source="expert_placement")
            placements = {name: base for name in names}
        if device.type != "cuda":
            return {n: ExpertPlacement(short="cpu", long="cpu", cpu_threads=p.cpu_threads, chunk_size=p.chunk_size,
                                       source=f"{p.source}; device {device}: cpu") for n, p in placements.items()}
        return placements

    return choose


def inference_reserve_bytes(engine: ExpertEngine) -> int:
    """GPU memory an inference job keeps free of resident experts: the two stream slots a long prefill uses (plus
    the landing buffer of quantized weights), plus 2 GiB for a prefill's activations, the KV cache and decode graphs
    (no gradients, no optimiser)."""
    modules = list(engine.modules.values())
    slots = 2 * max((m.dense_bytes() for m in modules), default=0)
    landing = max((m.host_bytes() for m in modules if m.expert_dtype in QUANT_DTYPES), default=0)
    return slots + landing + 2 * 2**30


def spread_layers(count: int, candidates: list[int], resident: list[int], num_layers: int) -> list[int]:
    """`count` of the `candidates` (layer positions 0..num_layers-1) to make resident, spread over the stack: each
    pick is the candidate farthest from every resident layer and from both ends of the stack (ties: the lower).

    Why spread: the streamer copies one layer ahead, so while a run of adjacent resident layers computes the copy
    engine has nothing to do (both slots already hold the next streamed layers); a resident layer between two
    streamed ones computes while the next streamed layer copies. Never picking layer 0 or the top layer first keeps
    each pass starting on a streamed layer the previous pass already prefetched."""
    taken = [-1, num_layers, *resident]
    left = sorted(candidates)
    picked: list[int] = []
    for _ in range(min(count, len(left))):
        best = max(left, key=lambda c: (min(abs(c - t) for t in taken), -c))
        picked.append(best)
        taken.append(best)
        left.remove(best)
    return picked


def make_resident(module: HostExperts, why: str) -> None:
    """Keep `module`'s experts on the GPU from now on (`gpu` for every pass), copying them there now."""
    p = module.placement
    module.placement = ExpertPlacement(short="gpu", long="gpu", cpu_threads=p.cpu_threads, chunk_size=p.chunk_size,
                                       source=f"{why} ({p.source})")
    module.resident_weights()


def demote_layer(module: HostExperts, placement: ExpertPlacement) -> None:
    """Undo `make_resident`: back to `placement` (the one before the promotion), the GPU copy freed."""
    module.placement = placement
    module.drop_resident()


def promote_layers(engine: ExpertEngine, count: int, *, spread: bool, why: str,
                   candidates: list[str] | None = None) -> list[str]:
    """Make `count` more layers resident (of `candidates`, default every layer not resident yet): spread over the
    stack (`spread_layers`) for training, from the bottom up otherwise (decode's CUDA graphs then cut fewer times);
    returns their names."""
    names = list(engine.modules)
    modules = list(engine.modules.values())
    resident = [i for i, m in enumerate(modules) if m.placement.long == "gpu" and m.placement.short == "gpu"]
    allowed = set(candidates) if candidates is not None else set(names)
    free = [i for i, name in enumerate(names) if name in allowed and i not in resident]
    picked = spread_layers(count, free, resident, len(names)) if spread else free[:count]
    for i in sorted(picked):
        make_resident(modules[i], why)
    return [names[i] for i in sorted(picked)]


def promote_resident_layers(engine: ExpertEngine, budget_bytes: int, device: torch.device,
                            reserve_bytes: int | None = None, *, spread: bool = False) -> int:
    """Keep as many layers' experts resident on the GPU as fit in `budget_bytes` minus what is already allocated
    and a reserve (default: a training step's activations; see `inference_reserve_bytes`); returns how many layers
    were promoted (`spread`: which ones, see `promote_layers`)."""
    modules = list(engine.modules.values())
    if not modules or device.type != "cuda":
        return 0
    used = torch.cuda.memory_allocated(device)
    # Activations of a 16k-token DPO micro-step with checkpointing peak at ~13 GB on V2-Lite (benchmarks/NOTES.md):
    # keep 60% of the budget for them and the two stream slots. Training measures its real peak after its first
    # step and promotes more layers then (kllama.train.promotion).
    reserve = max(int(0.6 * budget_bytes), 8 * 2**30) if reserve_bytes is None else reserve_bytes
    room = budget_bytes - used - reserve
    # every MoE layer of a model has the same size; resident weights are held in the compute dtype, quantized or not
    count = max(0, room // max(m.dense_bytes() for m in modules))
    return len(promote_layers(engine, count, spread=spread, why="resident within max_gpu_memory"))


def fill_gpu_memory(engine: ExpertEngine, device: torch.device, utilization: float) -> list[str]:
    """Inference without `max_gpu_memory`: make layers placed `auto` resident, bottom layers first, while
    `utilization` x the GPU's total memory allows, less what other processes hold and `inference_reserve_bytes`
    (vLLM's `gpu_memory_utilization`); called once the KV cache is allocated, so the cache is sized first. Returns
    the promoted layers' names (none on a CPU device or with `utilization` 0)."""
    modules = engine.modules
    candidates = [name for name, m in modules.items() if m.placement.mode == "auto"]
    if device.type != "cuda" or utilization <= 0 or not candidates:
        return []
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # other processes (and the CUDA context)
    room = int(utilization * total) - others - torch.cuda.memory_allocated(device) - inference_reserve_bytes(engine)
    count = max(0, room // max(m.dense_bytes() for m in modules.values()))
    return promote_layers(engine, count, spread=False, candidates=candidates,
                          why=f"resident within gpu_memory_utilization {utilization:g}")


def load_on_engine(source: ModelSource, config: KllamaConfig, *, device: torch.device, dtype: torch.dtype,
                   attn_implementation: str | None, inference: bool = False) -> tuple[PreTrainedModel, ExpertEngine]:
    """The checkpoint of `source` with routed experts in (pinned) host RAM placed per the config, non-expert
    weights on `device`; applies `max_gpu_memory` (keeping a training step's activation reserve free, or only what
    inference needs when `inference`) and prints the placement table."""
    for line in engine_notices(config):
        print(line, flush=True)
    notes: list[str] = []
    model, engine = load_checkpoint(source, placements_fn=placement_chooser(config, device, notes),
                                    compute_device=device, dtype=dtype, attn_implementation=attn_implementation,
                                    expert_dtype=config.engine.expert_dtype)
    assert engine is not None  # placements were given
    if config.engine.max_gpu_memory and device.type == "cuda":
        budget = parse_bytes(config.engine.max_gpu_memory)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        promote_resident_layers(engine, budget, device, inference_reserve_bytes(engine) if inference else None,
                                spread=not inference)
    print(placement_table(engine, notes=notes), flush=True)
    for note in (engine.measurement_note(), engine.split_note()):
        if note:
            print(note, flush=True)
    return model, engine
