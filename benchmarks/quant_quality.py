"""Quality of quantized routed experts (`expert_dtype`), reported rather than assumed: bf16 vs fp8 vs int8 vs int4.

    PYTHONPATH=src python benchmarks/quant_quality.py --demo                 # CPU: the demo's trained tiny model
    PYTHONPATH=src python benchmarks/quant_quality.py --model v2lite         # GPU box: full-size random V2-Lite shape

`--demo` (CPU, needs `datasets`): the tiny DeepSeek-V2 model of `make demo`, DPO-trained with the demo's settings in
`--workdir` (reused when an adapter is already there), loaded the way `kllama chat` loads it (expert engine, adapter
attached, bf16 weights) once per expert dtype. On the demo's held-out pairs it reports the per-token log-probs of the
response tokens under base + adapter, |difference| to the bf16 run (mean, max), and the DPO reward accuracy (policy
= base + adapter, reference = the same base without it; ties count one half) with its agreement with bf16's and the
reward margins themselves (`(log pi_c - log ref_c) - (log pi_r - log ref_r)` in nats, before beta: mean, and mean
|difference| to bf16). A float32 row shows how far bf16 rounding alone moves the same numbers.

`--model v2lite` (GPU box): the full-size random V2-Lite shape built once in bf16, its routed experts then quantized
layer by layer (the same weights), experts streamed: per-token log-prob |difference| to bf16 on random token rows
(random weights give near-uniform predictions, so this is small by construction), and each MoE layer's routed-expert
output error on the bf16 run's own inputs, `|y_q - y| / |y|` (mean and max over layers), which does not depend on
what the model predicts.

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build_model, compute_device, environment, format_table, log, model_config, release, shape_summary,
    synchronize, write_results,
)
from kllama.experts.install import wire_engine  # noqa: E402
from kllama.experts.module import HostExperts  # noqa: E402
from kllama.experts.quant import QuantizedWeight, quantize  # noqa: E402
from kllama.train.logprobs import token_logps  # noqa: E402

SCHEMES = ("fp8", "int8", "int4")
COLUMNS = (
    ("name", "experts", "{}"),
    ("host_mb", "expert host MB", "{:,.2f}"),
    ("logp_mean", "logp mean", "{:.3f}"),
    ("logp_abs_diff_mean", "|dlogp| mean", "{:.2e}"),
    ("logp_abs_diff_max", "|dlogp| max", "{:.2e}"),
    ("reward_accuracy", "reward acc", "{:.3f}"),
    ("reward_agreement", "agrees w/ bf16", "{:.3f}"),
    ("margin_mean", "margin mean", "{:.3f}"),
    ("margin_abs_diff_mean", "|dmargin| mean", "{:.2e}"),
    ("expert_rel_err_mean", "expert err mean", "{:.2e}"),
    ("expert_rel_err_max", "expert err max", "{:.2e}"),
    ("note", "note", "{}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help="the demo's trained tiny model on the CPU")
    p.add_argument("--workdir", type=Path, default=Path(".demo"), help="--demo: model + adapter (trained if absent)")
    p.add_argument("--model", choices=("v2lite", "qwen3-30b", "qwen3-235b"), default=None,
                   help="full-size random model of this shape (GPU box)")
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    p.add_argument("--rows", type=int, default=4, help="random token rows (full-size run)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (full-size run)")
    p.add_argument("--tiny", action="store_true", help="full-size run on the tiny config (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


def label_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 log-probs of every label token `[N]` (row-major order) and each row's sum `[B]`."""
    from kllama.train.trainer import causal_lm_of

    lm = causal_lm_of(model)
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state  # [B, T, H]
    labels = batch["labels"][:, 1:]  # position t predicts label t+1
    mask = labels != -100
    rows = hidden[:, :-1][mask]  # [N, H]
    logps = token_logps(rows, lm.lm_head, labels[mask])  # [N]
    owner = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=logps.device).index_add_(0, owner,
                                                                                              logps.double())
    return logps.float().cpu(), sums.cpu()


def diff_stats(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got - ref).abs()
    return {"logp_abs_diff_mean": diff.mean().item(), "logp_abs_diff_max": diff.max().item()}


# ----------------------------------------------------------------------------- the demo's trained tiny model
def trained_demo(workdir: Path) -> tuple[dict[str, Any], list[dict]]:
    """The demo's settings (model + adapter in `workdir`, trained first when absent) and its held-out rows."""
    from transformers import AutoTokenizer

    from kllama.config import build_config
    from kllama.data import build_dataset, get_template
    from kllama.demo import DEMO_SETTINGS
    from kllama.model.tiny import write_tiny_model
    from kllama.train.run import run_training

    model_dir, out_dir = workdir / "tiny-deepseek-v2", workdir / "saves" / "dpo"
    settings = dict(DEMO_SETTINGS, model_name_or_path=str(model_dir), output_dir=str(out_dir),
                    cache_dir=str(workdir / "cache"), plot_loss=False)
    config = build_config(settings, command="train") if model_dir.is_dir() else None
    if not (out_dir / "adapter_model.safetensors").is_file():
        log(f"training the demo adapter in {workdir} (DPO, the demo's settings)")
        write_tiny_model(model_dir, "deepseek_v2", seed=0)
        config = build_config(settings, command="train")
        run_training(config)
    assert config is not None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = get_template(config.data.template, tokenizer)
    bundle = build_dataset(config.data, tokenizer, template, stage="dpo", seed=config.training.seed,
                           cache_dir=config.model.cache_dir)
    return settings, [bundle.eval[i] for i in range(len(bundle.eval))]


def demo_variant(settings: dict[str, Any], rows: list[dict], infer_dtype: str, expert_dtype: str,
                 ) -> dict[str, Any]:
    """Load base + adapter on the engine (CPU) with `infer_dtype` weights and `expert_dtype` experts; per-token
    policy log-probs and per-pair policy/reference margins over the held-out rows."""
    from kllama.config import build_config
    from kllama.data import PairwiseCollator
    from kllama.model.adapters import adapters_disabled
    from kllama.model.load import load_model

    config = build_config(dict(settings, adapter_name_or_path=settings["output_dir"], infer_backend="ktransformers",
                               infer_dtype=infer_dtype, expert_dtype=expert_dtype), command="chat")
    loaded = load_model(config, "infer", device="cpu")
    collate = PairwiseCollator(0, pad_to_multiple_of=8)
    tokens, policy, reference = [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = collate(rows[start:start + 16])
            logps, sums = label_logps(loaded.model, batch)
            tokens.append(logps)
            policy.append(sums)
            with adapters_disabled(loaded.model):
                reference.append(label_logps(loaded.model, batch)[1])

    def margins(sums: list[torch.Tensor]) -> torch.Tensor:  # log p(chosen) - log p(rejected) per pair
        return torch.cat([s[: s.shape[0] // 2] - s[s.shape[0] // 2:] for s in sums])

    reward_margin = margins(policy) - margins(reference)
    return {"tokens": torch.cat(tokens), "reward_margin": reward_margin,
            "host_mb": loaded.engine.host_bytes() / 1e6 if loaded.engine is not None else None}


def demo_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    settings, held_out = trained_demo(args.workdir)
    log(f"{len(held_out)} held-out pairs")
    variants = {"bf16": ("bfloat16", "bf16"), "float32 weights (context)": ("float32", "bf16"),
                **{scheme: ("bfloat16", scheme) for scheme in SCHEMES}}
    runs = {}
    for name, (infer_dtype, expert_dtype) in variants.items():
        start = time.perf_counter()
        runs[name] = demo_variant(settings, held_out, infer_dtype, expert_dtype)
        log(f"{name}: {time.perf_counter() - start:.1f}s")
    ref = runs["bf16"]
    ref_sign = ref["reward_margin"] > 0
    rows = []
    for name, run in runs.items():
        margin = run["reward_margin"]
        row = {"name": name, "host_mb": run["host_mb"], "logp_mean": run["tokens"].mean().item(),
               "reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(),
               "reward_agreement": ((margin > 0) == ref_sign).float().mean().item(),
               "margin_mean": margin.mean().item()}
        if name != "bf16":
            row.update(diff_stats(run["tokens"], ref["tokens"]),
                       margin_abs_diff_mean=(margin - ref["reward_margin"]).abs().mean().item())
        row["note"] = {"bf16": "baseline: experts not quantized",
                       "float32 weights (context)": "what bf16 rounding alone moves"}.get(name, "experts quantized")
        rows.append(row)
    meta = {"held_out_pairs": len(held_out), "label_tokens": int(ref["tokens"].numel()),
            "model": "tiny deepseek_v2 (make demo), DPO adapter", "weights_dtype": "bfloat16"}
    return rows, meta


# ----------------------------------------------------------------------------- full-size random model
def quantized_twin(module: HostExperts, scheme: str, device: torch.device) -> HostExperts:
    """`module` with its weights quantized with `scheme` (on the GPU when there is one), same placement."""
    held = []
    for weight, projections in zip(module.host_weights(), (2, 1)):
        q = quantize(weight.to(device), scheme, projections=projections)
        held.append(QuantizedWeight(q.data.cpu(), q.scale.cpu(), module.dtype, projections))
        del q
    return HostExperts(held[0], held[1], module.act_fn, module.placement, module.name,
                       compute_device=module.compute_device)


def capture_expert_io(modules: dict[str, HostExperts], max_tokens: int) -> tuple[dict, list]:
    """Forward hooks keeping each layer's routed-expert inputs and output (first `max_tokens` tokens)."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def hook(name: str):  # noqa: ANN202
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name not in seen:
                x, index, weights = inputs
                seen[name] = (x[:max_tokens].detach(), index[:max_tokens], weights[:max_tokens].detach(),
                              output[:max_tokens].detach())
        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    return seen, handles


def full_size_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device = compute_device()
    config = model_config(args.model, tiny=args.tiny, layers=args.layers)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, modules = build_model(config, device, host_experts=True)
    log(f"built {args.model} in {time.perf_counter() - start:.1f}s ({len(modules)} MoE layers)")
    engine = wire_engine(model, modules, measure=False)
    ids = torch.randint(0, config.vocab_size, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.to(device)}
    seen, handles = capture_expert_io(modules, max_tokens=2048)
    with torch.no_grad():
        ref, _ = label_logps(model, batch)
    synchronize(device)
    for handle in handles:
        handle.remove()
    rows = [{"name": "bf16", "host_mb": engine.host_bytes() / 1e6, "logp_mean": ref.mean().item(),
             "note": "baseline: experts not quantized"}]
    for scheme in SCHEMES:
        start = time.perf_counter()
        twins = {name: quantized_twin(m, scheme, device) for name, m in modules.items()}
        for name, twin in twins.items():
            model.set_submodule(name, twin)
        twin_engine = wire_engine(model, twins, measure=False)
        with torch.no_grad():
            got, _ = label_logps(model, batch)
            errors = []
            for name, (x, index, weights, out) in seen.items():
                y = twins[name](x, index, weights)
                errors.append(((y.float() - out.float()).norm() / out.float().norm()).item())
        synchronize(device)
        rows.append({"name": scheme, "host_mb": twin_engine.host_bytes() / 1e6, **diff_stats(got, ref),
                     "expert_rel_err_mean": sum(errors) / len(errors), "expert_rel_err_max": max(errors),
                     "note": f"experts quantized ({time.perf_counter() - start:.0f}s)"})
        log(f"{scheme}: {rows[-1]}")
        for name, module in modules.items():
            model.set_submodule(name, module)
        del twins, twin_engine
        release()
    meta = {"model": args.model, "tiny": args.tiny, "layers": config.num_hidden_layers,
            "config": shape_summary(config), "rows_x_seq": [args.rows, args.seq], "placement": "stream",
            "label_tokens": int(ref.numel()), "device": str(device)}
    return rows, meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.tiny:
        import warnings

        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")
    if args.demo == (args.model is not None):
        raise SystemExit("give either --demo or --model")
    rows, meta = demo_rows(args) if args.demo else full_size_rows(args)
    stem = "quant_quality_demo" if args.demo else f"quant_quality_{args.model}{'_tiny' if args.tiny else ''}"
    results = {"benchmark": "quant_quality", **meta, "environment": environment(), "rows": rows}
    print(format_table(rows, COLUMNS), flush=True)
    path = write_results(results, stem, args.out_dir)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
