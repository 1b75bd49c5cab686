"""Run by test_distributed.py in every rank of a 2-process job (and in-process there for the single-process
references). Loads tiny models for training the way `kllama train` does in a data-parallel run (routed experts in one
host copy per node) and writes to `<out>/rank<R>.pt`:

* `memory`: the routed weights' checksums and this process's mappings of the shared memory (size, RSS, PSS, inode
  from /proc/self/smaps);
* per case, the first optimiser step's loss and every LoRA gradient as the optimiser sees them. Every case's step
  covers the same 8 rows whatever the process count.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

_ROWS = 8
CASES = ("dpo", "sft", "dpo_passes", "sft_passes", "dpo_bf16")


def _case_settings(case: str, world: int) -> dict[str, Any]:
    """Config keys of `case` for `world` processes: each process gets `_ROWS / world` rows of the one step."""
    per_rank = _ROWS // world
    return {
        "dpo": {"stage": "dpo", "dataset": "dpo_en_demo", "per_device_train_batch_size": per_rank},
        "sft": {"stage": "sft", "dataset": "alpaca_en_demo", "per_device_train_batch_size": per_rank},
        # micro-batching: a step's rows run in passes of <= 300 tokens; with 2 ranks, one has 3 passes, the other 2
        "dpo_passes": {"stage": "dpo", "dataset": "dpo_en_demo", "cutoff_len": 128, "per_device_train_batch_size": 1,
                       "gradient_accumulation_steps": per_rank, "micro_batch_tokens": 300},
        # SFT in passes (4 vs 3 per rank): the step's token mean needs every rank's label-token count
        "sft_passes": {"stage": "sft", "dataset": "alpaca_en_demo", "cutoff_len": 128, "per_device_train_batch_size": 1,
                       "gradient_accumulation_steps": per_rank, "micro_batch_tokens": 150},
        # mixed precision: bf16 weights, LoRA branches under autocast, the frozen layers as loaded in every rank
        "dpo_bf16": {"stage": "dpo", "dataset": "dpo_en_demo", "per_device_train_batch_size": per_rank, "bf16": True},
    }[case]


class FirstStep(TrainerCallback):
    """Keeps the first optimiser step's gradients (after DDP's all-reduce) and its logged loss."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None
        self.loss: float | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.grads is None:
            self.grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.loss is None and logs and "loss" in logs:
            self.loss = float(logs["loss"])


def load_for_training(config: Any):  # noqa: ANN201
    """`load_model(config, "train")` inside `expert_memory_per_node`, as `kllama train` runs it, on the CPU on any
    machine: the ranks run with no visible GPU (gloo), and the in-process references must compute where they do."""
    from kllama.model.load import load_model
    from kllama.train.distributed import dist_info, expert_memory_per_node

    with expert_memory_per_node(dist_info(), config.engine.use_kt):
        return load_model(config, "train", device="cpu")


def first_step(model_dir: Path, output_dir: Path, case: str, world: int, autocast_seen: list[bool] | None = None,
               ) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of the first step of `case` run by `world` processes (CPU experts; fp32 unless the
    case sets bf16). `autocast_seen` gets, for each call of a frozen layer (the routers), whether autocast was on."""
    from transformers import set_seed

    from kllama.config import build_config
    from kllama.data import PairwiseCollator, SFTCollator, build_dataset, get_template
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.train.micro_batching import apply_micro_batching
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer

    config = build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(output_dir), "template": "deepseek", "cutoff_len": 64,
        "max_samples": _ROWS, "max_steps": 1, "logging_steps": 1, "use_kt": True, "expert_placement": "cpu",
        "lora_rank": 4, "seed": 3, "disable_tqdm": True, "save_strategy": "no", **_case_settings(case, world),
    })
    stage = config.finetuning.stage
    set_seed(3)
    loaded = load_for_training(config)  # fp32 unless the case sets bf16
    template = get_template("deepseek", loaded.tokenizer)
    bundle = build_dataset(config.data, loaded.tokenizer, template, stage=stage, seed=3, cache_dir=None)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=3)
    with torch.no_grad():  # non-zero B, so every LoRA tensor (A included) has a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    if autocast_seen is not None:
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                module.register_forward_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    collate = (PairwiseCollator if stage == "dpo" else SFTCollator)(loaded.tokenizer.pad_token_id)
    train_set, collate, plan = apply_micro_batching(config, loaded.engine, bundle.train, collate)
    capture = FirstStep()
    trainer = KllamaTrainer(
        model=model, args=build_training_arguments(config, has_eval=False, use_cpu=True, plan=plan),
        train_dataset=train_set, data_collator=collate, processing_class=loaded.tokenizer, callbacks=[capture],
        settings=preference_settings(config),
    )
    trainer.train()
    assert capture.grads is not None and capture.loss is not None
    return capture.loss, capture.grads


def expert_checksums(engine) -> dict[str, list[float]]:  # noqa: ANN001
    """Layer name -> sums and sums of squares of its routed gate_up and down weights (float64)."""
    out = {}
    for name, module in engine.modules.items():
        gate_up, down = module.host_weights()
        out[name] = [float(t.double().sum()) for t in (gate_up, down)] + [float(t.double().square().sum())
                                                                          for t in (gate_up, down)]
    return out


def shared_mappings(marker: str) -> dict[str, Any]:
    """Total Size / Rss / Pss (bytes) of this process's mappings whose path contains `marker`, and their inodes."""
    totals: dict[str, Any] = {"size": 0, "rss": 0, "pss": 0, "mappings": 0}
    inodes: set[int] = set()
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = marker in line
            if current:
                totals["mappings"] += 1
                inodes.add(int(fields[4]))
        elif current and fields and fields[0] in ("Size:", "Rss:", "Pss:"):
            totals[fields[0][:-1].lower()] += int(fields[1]) * 1024
    totals["inodes"] = sorted(inodes)
    return totals


def memory_config(model_dir: Path) -> Any:
    from kllama.config import build_config

    return build_config({"model_name_or_path": str(model_dir), "output_dir": "/nonexistent/out", "use_kt": True,
                         "dataset": "dpo_en_demo", "expert_placement": "cpu"})


def memory_report(model_dir: Path) -> dict[str, Any]:
    """Load the model as training does and report the experts and this rank's view of the shared memory."""
    from kllama.experts.shared_host import MEMFD_NAME
    from kllama.train.distributed import barrier

    loaded = load_for_training(memory_config(model_dir))
    sums = expert_checksums(loaded.engine)  # reads (so maps in) every page of the weights
    barrier()  # every rank has the pages mapped now: PSS splits them between the ranks
    report = {"sums": sums, "mapped": shared_mappings(f"memfd:{MEMFD_NAME}"),
              "host_bytes": sum(m.host_bytes() for m in loaded.engine.modules.values())}
    barrier()  # nobody unmaps before every rank has measured
    return report


def main() -> None:
    from kllama.train.distributed import init_distributed, shutdown_distributed

    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank = init_distributed(120)
    result: dict[str, Any] = {"memory": memory_report(model_dir)}
    seen: list[bool] = []
    result.update({case: first_step(model_dir, out / case, case, rank.world_size,
                                    seen if case == "dpo_bf16" else None) for case in CASES})
    result["autocast_in_frozen_layers"] = seen
    torch.save(result, out / f"rank{rank.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
