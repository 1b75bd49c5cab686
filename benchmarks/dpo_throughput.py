"""DPO micro-step throughput of kllama's expert engine vs the stock transformers + peft way, on full-size random models.

One invocation per model (fits one 10-minute call on the GPU box):

    PYTHONPATH=src python benchmarks/dpo_throughput.py --model v2lite --placements stream,auto,gpu,cpu \
        --gpu-cap-gb 24 --baseline
    PYTHONPATH=src python benchmarks/dpo_throughput.py --model v2lite --placements stream --gpu-cap-gb 24 \
        --expert-dtype bf16,fp8,int8 --no-kt        # one set of engine rows per expert dtype, bf16 first
    PYTHONPATH=src python benchmarks/dpo_throughput.py --model qwen3-235b --layers 8 --placements stream \
        --gpu-cap-gb 24 --expert-dtype bf16,fp8 --no-kt --no-probe   # tok/s per layer, projected to 94 layers

Each micro-step is what the trainer does for `stage: dpo`, `lora_target: all`, r=8: the reference (adapters off, no
grad; its own pass, or inside the policy's forward layer by layer where layers stream, as `kllama train` does since
the eighth session: the `reference` column), the policy pass, backward (gradient checkpointing, non-reentrant) and
an AdamW step on the LoRA parameters,
over `2 * pairs * seq` synthetic policy tokens. Rows: one per expert placement (`stream` and `auto` under the GPU
cap; `gpu` uncapped, it needs all experts resident; `cpu` extrapolated from one layer, a real step at 16k tokens
takes minutes), the stock baselines (all weights on the GPU, separate reference forward; full logits as
LLaMA-Factory/TRL compute them, and with kllama's chunked log-probs), kt-kernel's AMX SFT MoE layer when importable,
and a bandwidth probe (one layer's pinned copy and grouped_mm forward+backward). With `--expert-dtype` the engine
model is built once per listed dtype (int8 / int4 / fp8: routed experts quantized, `expert_dtype`) and its placement rows
repeated, with the host memory each build holds; the probe, `cpu` and kt-kernel rows run on the first dtype's model.
With `--layers N` each engine row also reports seconds per layer and projects the full model's tok/s (the step
time scaled by layers / N: conservative, the embedding, LM head and loss are counted once per N layers).
Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ExpertTimes, build_model, comma_list, compute_device, current_host_gb, environment, expert_dtype_list,
    expert_timing, format_table, gpu_peak_gb, log, model_config, peak_host_gb, placement_list, probe_copy_waits,
    release, reset_gpu_peak, set_gpu_cap, shape_summary, split_expert_time, synchronize, write_result_file, write_results,
)
from kllama.experts.install import wire_engine  # noqa: E402
from kllama.experts.swiglu import eager_gated  # noqa: E402
from kllama.model.fused_norm import fuse_rms_norms  # noqa: E402
from probes import bandwidth_probe, kt_kernel_probe  # noqa: E402
from kllama.experts.placement import ExpertPlacement  # noqa: E402
from kllama.model.adapters import adapters_disabled, attach_lora, lora_parameters, resolve_lora_spec  # noqa: E402
from kllama.train.losses import preference_loss  # noqa: E402
from kllama.train.mixed_precision import autocast_lora_branches  # noqa: E402
from kllama.train.lockstep import LockstepReference, lockstep_for_run  # noqa: E402
from kllama.train.micro_batching import expert_passes  # noqa: E402
from kllama.train.trainer import PreferenceSettings, causal_lm_of, hidden_logps, policy_logps  # noqa: E402

SETTINGS = PreferenceSettings()  # sigmoid DPO, beta 0.1, 4096-token log-prob chunks
LORA_RANK = 8
LEARNING_RATE = 5e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b", "qwen3-235b"), default="v2lite")
    p.add_argument("--placements", default="stream,auto,gpu,cpu", help="comma list of stream|auto|gpu|cpu")
    p.add_argument("--gpu-cap-gb", type=float, default=None, help="GPU memory cap for stream/auto (e.g. 24)")
    p.add_argument("--baseline", action="store_true", help="also run stock transformers + peft (when it fits)")
    p.add_argument("--baseline-logps", default="full,chunked", help="stock log-probs: full logits and/or chunked")
    p.add_argument("--no-kt", action="store_true", help="skip the kt-kernel AMX probe")
    p.add_argument("--no-probe", action="store_true", help="skip the copy / grouped_mm bandwidth probe")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precomputed-ref", type=int, default=0, metavar="F",
                   help="also time each engine placement with precompute_ref_log_probs: steps without a reference "
                        "pass + one no-grad reference pass over F x the batch (precompute_ref_batch_size), / F")
    p.add_argument("--layers", type=int, default=None, help="benchmark only the first N decoder layers")
    p.add_argument("--expert-dtype", default="bf16",
                   help="comma list of bf16|fp8|int8|int4: engine rows per expert dtype (bf16 = not quantized)")
    p.add_argument("--cpu-threads", type=int, default=16, help="threads of the CPU expert path (cpu_infer)")
    p.add_argument("--kt-tokens", type=int, default=4096, help="tokens per kt-kernel layer call")
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    p.add_argument("--ops", default="fused",
                   help="comma list of fused|eager: the engine rows with kllama's fused kernels (the RMSNorms "
                        "through torch's rms_norm, the experts' gated activation in one Triton pass each way; what "
                        "`kllama train` runs) and/or with the eager ops they replace (eager rows run first)")
    p.add_argument("--profile", action="store_true",
                   help="after each engine row's timed steps, profile one more step (torch.profiler, CUDA) and write "
                        "its op table next to the JSON")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="skip rows not started after this many seconds (the GPU call is killed at 600)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the step
def synthetic_batch(vocab: int, pairs: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """`[chosen; rejected]` rows of random tokens, no padding, the first quarter of each row a prompt (no labels)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, seq), generator=gen)  # [2P, S]
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def chunked_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed label log-probs `[2P]` the way kllama's trainer computes them (chunked, no full logits)."""
    return policy_logps(model, batch, SETTINGS)[0]


def full_logits_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed label log-probs `[2P]` from the full `[2P, S, V]` logits, as LLaMA-Factory's / TRL's DPO do."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]  # [2P, S-1]
    mask = labels != -100
    logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             logps_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
             ref: torch.Tensor | None = None, lockstep: LockstepReference | None = None) -> float:
    """Reference pass (unless `ref [2P]` was precomputed; inside the policy's forward, layer by layer, with
    `lockstep`, as `kllama train` runs it when layers stream), policy pass, sigmoid-DPO loss, backward, optimizer
    step; returns the loss."""
    if ref is None and lockstep is not None:
        with lockstep.following() as reference_hidden:
            policy = logps_fn(model, batch)  # [2P]
        with torch.no_grad():
            ref = hidden_logps(reference_hidden(), causal_lm_of(model), batch, SETTINGS)[0]  # [2P]
    else:
        if ref is None:
            with torch.no_grad(), adapters_disabled(model):
                ref = logps_fn(model, batch)  # [2P]
        policy = logps_fn(model, batch)  # [2P]
    half = policy.shape[0] // 2
    losses, _, _ = preference_loss("sigmoid", policy[:half], policy[half:], ref[:half], ref[half:],
                                   beta=SETTINGS.beta)
    loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def prepare_training(model: nn.Module) -> nn.Module:
    """LoRA r=8 on `all` (PEFT linears + routed experts), gradient checkpointing (non-reentrant), train mode."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    peft_model = attach_lora(model, resolve_lora_spec(model, ["all"], LORA_RANK, None, 0.0))
    dtype = next(model.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):  # what `kllama train` does under bf16/fp16 (mixed precision)
        autocast_lora_branches(peft_model, next(model.parameters()).device.type, dtype)
    peft_model.train()
    return peft_model


def time_steps(name: str, model: nn.Module, batch: dict[str, torch.Tensor], logps_fn: Callable,
               args: argparse.Namespace, device: torch.device, times: ExpertTimes | None, tokens: int,
               ref: torch.Tensor | None = None, lockstep: LockstepReference | None = None) -> dict[str, Any]:
    """Warm-up then timed DPO steps of `model`; one table/JSON row."""
    optimizer = torch.optim.AdamW(list(lora_parameters(model).values()), lr=LEARNING_RATE)
    reset_gpu_peak(device)
    for i in range(args.warmup):
        start = time.perf_counter()
        loss = dpo_step(model, batch, optimizer, logps_fn, ref, lockstep)
        synchronize(device)
        log(f"{name}: warm-up {i + 1}/{args.warmup} {time.perf_counter() - start:.2f}s loss {loss:.4f}")
    step_s: list[float] = []
    if times is not None:
        times.reset()
        times.recording = True
    try:
        for i in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            loss = dpo_step(model, batch, optimizer, logps_fn, ref, lockstep)
            synchronize(device)
            step_s.append(time.perf_counter() - start)
            if times is not None:
                times.collect()
            log(f"{name}: step {i + 1}/{args.steps} {step_s[-1]:.2f}s ({tokens / step_s[-1]:,.0f} tok/s) "
                f"loss {loss:.4f}")
    finally:
        if times is not None:
            times.recording = False
    if getattr(args, "profile", False) and device.type == "cuda":
        profile_step(name, lambda: dpo_step(model, batch, optimizer, logps_fn, ref, lockstep), args, device)
    mean = sum(step_s) / len(step_s)
    row: dict[str, Any] = {
        "name": name, "tokens_per_s": tokens / mean, "s_per_step": mean, "step_s": step_s,
        "peak_gpu_gb": gpu_peak_gb(device), "peak_host_gb": peak_host_gb(), "host_now_gb": current_host_gb(),
    }
    if times is not None:
        expert, wait = split_expert_time(times)
        row.update(expert_s=expert / len(step_s), copy_wait_s=wait / len(step_s), expert_passes=times.passes,
                   rest_s=mean - (expert + wait) / len(step_s))
    del optimizer
    return row


def profile_step(name: str, step: Callable[[], float], args: argparse.Namespace, device: torch.device) -> Path:
    """One more step under torch.profiler: the ops and kernels by GPU time, and the same grouped by input shape,
    written as text to the JSON's directory (and `$OUT`)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, acc_events=True) as prof:
        step()
        synchronize(device)
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    text = "\n\n".join([
        f"{name}: one profiled step, ops and kernels by self GPU time",
        prof.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=70),
        "grouped by input shape",
        prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=60,
                                                           max_name_column_width=50, max_shapes_column_width=70),
    ])
    path = write_result_file(f"profile_dpo_{args.model}_{slug}.txt", text + "\n", args.out_dir)
    log(f"{name}: profile written to {path}")
    return path


class Report:
    """The result document, rewritten after every row so that a run killed at the time limit still leaves JSON."""

    def __init__(self, results: dict[str, Any], stem: str, out_dir: Path | None, budget_s: float) -> None:
        self.results, self.stem, self.out_dir, self.budget_s = results, stem, out_dir, budget_s
        results["rows"] = []
        self.start = time.perf_counter()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.results["rows"]

    def out_of_time(self) -> bool:
        """True once the run has used its time budget (later rows are skipped, the JSON still written)."""
        return time.perf_counter() - self.start > self.budget_s

    def save(self) -> Path:
        return write_results(self.results, self.stem, self.out_dir)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.save()

    def run_row(self, name: str, run: Callable[[], dict[str, Any]], device: torch.device) -> None:
        """Run one row; out of time or out of GPU memory becomes a row saying so instead of ending the invocation."""
        if self.out_of_time():
            log(f"{name}: skipped, past the {self.budget_s:.0f}s budget")
            self.add({"name": name, "note": "skipped: time budget"})
            return
        try:
            self.add(run())
        except torch.cuda.OutOfMemoryError as exc:
            log(f"{name}: out of GPU memory: {str(exc).splitlines()[0]}")
            self.add({"name": name, "note": "OOM", "error": str(exc).splitlines()[0]})
        except Exception as exc:  # noqa: BLE001 - one broken row must not cost the whole GPU call
            traceback.print_exc()
            log(f"{name}: failed: {type(exc).__name__}: {exc}")
            self.add({"name": name, "note": "failed", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            release()
            reset_gpu_peak(device)


# ----------------------------------------------------------------------------- kllama placements
def place_experts(lm: nn.Module, modules: dict, mode: str, args: argparse.Namespace, device: torch.device,
                  ) -> tuple[Any, dict[str, Any]]:
    """Give every MoE layer placement `mode`, rewire the engine (fresh traced streamer; `auto` measures its
    crossover and promotes layers to resident within the cap) and make `gpu` layers resident."""
    from kllama.model.engine_setup import promote_resident_layers

    for module in modules.values():
        module.drop_resident()
        module.placement = ExpertPlacement.from_mode(mode, cpu_threads=args.cpu_threads, source="benchmark")
    release()
    engine = wire_engine(lm, modules, measure=mode == "auto", trace=True)
    info: dict[str, Any] = {}
    if mode == "auto":
        budget = int((args.gpu_cap_gb or torch.cuda.get_device_properties(device).total_memory / 1e9) * 1e9) \
            if device.type == "cuda" else 0
        info["resident_layers"] = promote_resident_layers(engine, budget, device)
        info["crossover_tokens"] = next(iter(modules.values())).placement.crossover_tokens
    if mode == "gpu":
        for module in modules.values():
            module.resident_weights()
    info["engine_gpu_gb"] = engine.gpu_bytes() / 1e9
    return engine, info


def precomputed_ref_row(model: nn.Module, lm: nn.Module, modules: dict, mode: str, name: str, capped: bool,
                        batch: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device,
                        tokens: int) -> dict[str, Any]:
    """`precompute_ref_log_probs` with `precompute_ref_batch_size` = F x the training batch: the reference pass runs
    once per F steps' worth of rows, with no gradients kept; the training steps run without it."""
    factor = args.precomputed_ref
    set_gpu_cap(args.gpu_cap_gb if capped else None, device)
    _, info = place_experts(lm, modules, mode, args, device)
    big = synthetic_batch(causal_lm_of(model).config.vocab_size, args.pairs * factor, args.seq, device, seed=1)
    ref_s = []
    for _ in range(2):  # the first pass warms up the larger shapes
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), adapters_disabled(model):
            chunked_logps(model, big)
        synchronize(device)
        ref_s.append(time.perf_counter() - start)
    log(f"{name}: reference pass over {factor} x {tokens:,} tokens {ref_s[-1]:.2f}s")
    with torch.no_grad(), adapters_disabled(model):
        ref = chunked_logps(model, batch)  # [2P] the steps' reference, as the cache would hold it
    row = time_steps(f"{name}, ref precomputed", model, batch, chunked_logps, args, device, None, tokens, ref)
    per_step = row["s_per_step"] + ref_s[-1] / factor
    row.update(info, name=f"{name}, ref precomputed (x{factor})", tokens_per_s=tokens / per_step,
               s_per_step=per_step, policy_step_s=row["s_per_step"], reference_pass_s=ref_s[-1],
               note=f"step without reference + 1/{factor} of a no-grad reference pass over {factor}x the batch")
    return row


def run_engine(args: argparse.Namespace, config: Any, device: torch.device, tokens: int,
               report: Report, expert_dtype: str = "bf16") -> tuple[nn.Module, dict]:
    """Build the engine model once (experts held as `expert_dtype`) and time each requested placement on it (except
    `cpu`, see `cpu_row`)."""
    log(f"building the expert-engine model (experts in pinned host memory, {expert_dtype})")
    rss_before = current_host_gb()
    torch.manual_seed(0)  # every dtype draws the same weights: a quantized build holds the bf16 build quantized
    start = time.perf_counter()
    lm, modules = build_model(config, device, host_experts=True, expert_dtype=expert_dtype,
                              fused_norms="eager" not in args.ops)
    results = report.results
    build = {"build_s": time.perf_counter() - start, "expert_host_gb": sum(m.host_bytes() for m in
                                                                            modules.values()) / 1e9,
             "expert_bf16_gb": sum(m.dense_bytes() for m in modules.values()) / 1e9,
             "host_rss_before_build_gb": rss_before, "host_rss_after_build_gb": current_host_gb()}
    results.setdefault("builds", {})[expert_dtype] = build
    if expert_dtype == args.expert_dtypes[0]:
        results.update(build)
    log(f"built in {build['build_s']:.1f}s: {len(modules)} MoE layers, {build['expert_host_gb']:.1f} GB of experts "
        f"on the host ({expert_dtype}; {build['expert_bf16_gb']:.1f} GB in bf16), "
        f"{torch.cuda.memory_allocated() / 1e9 if device.type == 'cuda' else 0:.1f} GB on the GPU, "
        f"host RSS {build['host_rss_after_build_gb']:.1f} GB (before the build {rss_before:.1f} GB)")
    model = prepare_training(lm)
    batch = synthetic_batch(config.vocab_size, args.pairs, args.seq, device)
    dtype_suffix = f", {expert_dtype}" if len(args.expert_dtypes) > 1 or expert_dtype != "bf16" else ""
    for ops in sorted(args.ops, key=lambda o: o != "eager"):  # eager first: fusing the norms is one-way
        if ops == "fused":
            fuse_rms_norms(model)
        suffix = dtype_suffix + (", eager ops" if ops == "eager" else "")
        with eager_gated() if ops == "eager" else nullcontext():
            run_placements(args, config, lm, model, modules, batch, device, tokens, report, expert_dtype, ops, suffix)
    for module in modules.values():
        module.drop_resident()
    return model, modules


def run_placements(args: argparse.Namespace, config: Any, lm: nn.Module, model: nn.Module, modules: dict,
                   batch: dict[str, torch.Tensor], device: torch.device, tokens: int, report: Report,
                   expert_dtype: str, ops: str, suffix: str) -> None:
    """The engine rows of one build: each requested placement (and its precomputed-reference row)."""
    for mode in [m for m in args.placements if m != "cpu"]:
        capped = mode in ("stream", "auto") and args.gpu_cap_gb is not None
        name = f"kllama {mode}" + (f" (cap {args.gpu_cap_gb:g} GB)" if capped else "") + suffix

        def run(mode: str = mode, name: str = name, capped: bool = capped) -> dict[str, Any]:
            set_gpu_cap(args.gpu_cap_gb if capped else None, device)
            engine, info = place_experts(lm, modules, mode, args, device)
            log(f"{name}: placement ready {info}")
            times = ExpertTimes()
            probe_copy_waits(engine.streamer, times)
            # the reference as `kllama train` computes it: inside the policy's forward when layers stream
            streamed = expert_passes(engine.placements)["stream"]
            lockstep = lockstep_for_run(lm, stage="dpo", reference_free=False, precomputed=False,
                                        starting_adapter=False, streamed_layers=streamed)
            with expert_timing(times):
                row = time_steps(name, model, batch, chunked_logps, args, device, times, tokens, lockstep=lockstep)
            row.update(info, expert_dtype=expert_dtype, ops=ops, streamed_layers=streamed,
                       reference="lock-step" if lockstep is not None else "own pass")
            if mode == "gpu":
                row["note"] = "all experts resident, no cap"
            elif lockstep is not None:
                row["note"] = "reference in lock-step with the policy (as kllama train)"
            project_layers(row, config, args)
            return row

        report.run_row(name, run, device)
        if args.precomputed_ref:
            report.run_row(f"{name}, ref precomputed (x{args.precomputed_ref})",
                           lambda mode=mode, name=name, capped=capped: precomputed_ref_row(
                               model, lm, modules, mode, name, capped, batch, args, device, tokens), device)
        set_gpu_cap(None, device)


def project_layers(row: dict[str, Any], config: Any, args: argparse.Namespace) -> None:
    """With `--layers N`: seconds per layer and the full model's projected tok/s (step time x full layers / N)."""
    if args.layers is None or "s_per_step" not in row:
        return
    full = model_config(args.model, tiny=args.tiny, layers=None).num_hidden_layers
    layers = config.num_hidden_layers
    row["s_per_layer"] = row["s_per_step"] / layers
    row["projected_layers"] = full
    row["projected_tokens_per_s"] = row["tokens_per_s"] * layers / full
    row["note"] = (row.get("note", "") + f"; {layers}/{full} layers: projected {row['projected_tokens_per_s']:,.0f} "
                   f"tok/s for the full model").lstrip("; ")


def cpu_row(model: nn.Module, modules: dict, args: argparse.Namespace, device: torch.device, tokens: int,
            rest_s: float | None) -> dict[str, Any]:
    """The `cpu` placement, extrapolated: one MoE layer's expert passes of a DPO step (reference forward, policy
    forward, checkpoint recompute forward, backward from the saved pre-activations) timed on the CPU path at the step's token count,
    times the number of MoE layers, plus the non-expert time measured in the GPU rows."""
    module = list(modules.values())[len(modules) // 2]
    config = causal_lm_of(model).config
    top_k = config.num_experts_per_tok
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, module.hidden_dim, generator=gen) * 0.5).to(device=device, dtype=torch.bfloat16)
    index = torch.rand(tokens, module.num_experts, generator=gen).topk(top_k, dim=-1).indices.to(device)  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen).to(device)  # [T, K]
    module.forced_target = "cpu"
    try:
        forwards = []  # reference, policy, checkpoint recompute
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                module(x, index, weights)
            forwards.append(time.perf_counter() - start)
        xg = x.detach().requires_grad_(True)
        out = module(xg, index, weights)
        synchronize(device)
        start = time.perf_counter()
        out.backward(torch.ones_like(out))
        synchronize(device)
        backward = time.perf_counter() - start
    finally:
        module.forced_target = None
    layer_s = sum(forwards) + backward
    expert_s = layer_s * len(modules)
    total = expert_s + (rest_s or 0.0)
    return {
        "name": f"kllama cpu ({args.cpu_threads} threads)", "tokens_per_s": tokens / total, "s_per_step": total,
        "expert_s": expert_s, "copy_wait_s": 0.0, "rest_s": rest_s, "peak_host_gb": peak_host_gb(),
        "layer_forward_s": forwards, "layer_backward_s": backward,
        "note": f"extrapolated: 1 layer x {len(modules)} MoE layers" + ("" if rest_s is not None else ", no rest"),
    }


# ----------------------------------------------------------------------------- stock baseline
def stock_weight_gb(config: Any) -> float:
    """bf16 weight bytes of the whole stock model (GB), from the config."""
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() for p in meta.parameters()) * 2 / 1e9


def run_stock(args: argparse.Namespace, config: Any, device: torch.device, tokens: int, report: Report) -> None:
    """Baseline (a): stock transformers + peft LoRA (`target_modules` + `target_parameters` for the experts), every
    weight on the GPU, a separate reference forward with the adapter disabled."""
    weights = stock_weight_gb(config)
    card = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else float("inf")
    variants = [v for v in args.baseline_logps.split(",") if v]
    # Activations at 16k tokens, LoRA states and the logits need ~20 GB more than the weights (52 GiB measured for
    # V2-Lite's 31 GB of weights); refuse up front rather than spend the call on an OOM.
    if weights + 20 > card:
        for v in variants:
            report.add({"name": f"stock+peft ({v} logps)", "note": f"does not fit: {weights:.1f} GB of weights on a "
                        f"{card:.0f} GB card", "weights_gb": weights})
        return
    if report.out_of_time():
        for v in variants:
            report.add({"name": f"stock+peft ({v} logps)", "note": "skipped: time budget"})
        return
    log(f"building the stock model ({weights:.1f} GB of weights on {device})")
    start = time.perf_counter()
    lm, _ = build_model(config, device, host_experts=False)
    log(f"built in {time.perf_counter() - start:.1f}s")
    model = prepare_training(lm)
    batch = synthetic_batch(config.vocab_size, args.pairs, args.seq, device)
    fns = {"full": full_logits_logps, "chunked": chunked_logps}
    for variant in variants:
        name = f"stock+peft ({variant} logps)"
        report.run_row(name, lambda v=variant, n=name: {
            **time_steps(n, model, batch, fns[v], args, device, None, tokens), "weights_gb": weights}, device)
    del model, lm, batch
    release()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.placements = placement_list(args.placements)
    args.expert_dtypes = expert_dtype_list(args.expert_dtype)
    args.ops = comma_list(args.ops)
    if not args.ops or any(o not in ("fused", "eager") for o in args.ops):
        raise SystemExit(f"--ops {args.ops!r}: a comma list of fused, eager")
    device = compute_device()
    if args.tiny:
        args.pairs, args.seq, args.warmup, args.steps = min(args.pairs, 1), min(args.seq, 32), 0, 1
        args.kt_tokens = min(args.kt_tokens, 32)
        args.cpu_threads = min(args.cpu_threads, os.cpu_count() or 1)
        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")
    torch.manual_seed(0)
    config = model_config(args.model, tiny=args.tiny, layers=args.layers)
    tokens = 2 * args.pairs * args.seq
    log(f"model {args.model}{' (tiny)' if args.tiny else ''}: {config.num_hidden_layers} layers, {tokens} policy "
        f"tokens/step ({args.pairs} pairs x 2 x {args.seq}), device {device}, cap {args.gpu_cap_gb} GB")
    results: dict[str, Any] = {
        "benchmark": "dpo_throughput", "model": args.model, "tiny": args.tiny, "layers": config.num_hidden_layers,
        "layers_limited": args.layers is not None, "config": shape_summary(config), "tokens_per_step": tokens,
        "pairs": args.pairs, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
        "gpu_cap_gb": args.gpu_cap_gb, "lora": {"rank": LORA_RANK, "target": "all"},
        "expert_dtypes": args.expert_dtypes, "ops": args.ops,
        "gradient_checkpointing": "non-reentrant", "environment": environment(),
        "time_split": "expert s = routed-expert executor time (CUDA events on the compute stream; wall time for the "
                      "CPU path) minus copy wait; copy wait = GPU time the compute stream waited for streamed "
                      "weights; rest = s/step - both",
    }
    report = Report(results, f"dpo_{args.model}{'_tiny' if args.tiny else ''}", args.out_dir, args.budget_s)
    rows = report.rows
    model, modules = run_engine(args, config, device, tokens, report, args.expert_dtypes[0])
    top_k = config.num_experts_per_tok
    if not args.no_probe:
        log("bandwidth probe: one layer's copy and grouped_mm forward+backward")
        results["probe"] = bandwidth_probe(next(iter(modules.values())), top_k, tokens, device)
        log(f"probe: {results['probe']}")
    if "cpu" in args.placements:
        log(f"cpu placement: timing one layer on {args.cpu_threads} threads at {tokens} tokens")
        rest = next((r.get("rest_s") for r in rows if r.get("rest_s") is not None and "gpu" in r["name"]), None) \
            or next((r.get("rest_s") for r in rows if r.get("rest_s") is not None), None)
        report.add(cpu_row(model, modules, args, device, tokens, rest))
        log(f"cpu: {rows[-1]['s_per_step']:.1f} s/step extrapolated")
    if not args.no_kt and args.expert_dtypes[0] == "bf16":
        log("kt-kernel AMX SFT probe")
        kt = kt_kernel_probe(next(iter(modules.values())), top_k, args.kt_tokens, args.cpu_threads, len(modules),
                             LORA_RANK)
        results["kt_kernel"] = kt
        log(f"kt-kernel: {kt}")
        if kt.get("status") == "ok":
            report.add({"name": f"kt-kernel AMX SFT ({args.cpu_threads} threads)",
                         "tokens_per_s": kt["tokens_per_s_all_layers"],
                         "expert_s": kt["layer_fwd_bwd_ms"] / 1e3 * len(modules) * tokens / args.kt_tokens,
                         "note": f"experts fwd+bwd only, 1 layer at {args.kt_tokens} tokens x {len(modules)} layers"})
        else:
            report.add({"name": "kt-kernel AMX SFT", "note": kt["status"]})
    del model, modules
    release()
    for expert_dtype in args.expert_dtypes[1:]:
        model, modules = run_engine(args, config, device, tokens, report, expert_dtype)
        if not args.no_probe:
            results.setdefault("probes", {})[expert_dtype] = bandwidth_probe(next(iter(modules.values())), top_k,
                                                                            tokens, device)
            log(f"probe ({expert_dtype}): {results['probes'][expert_dtype]}")
        del model, modules
        release()
    if args.baseline:
        run_stock(args, config, device, tokens, report)
    results["total_s"] = time.perf_counter() - report.start
    print(format_table(rows), flush=True)
    path = report.save()
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
