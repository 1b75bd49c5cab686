"""`kllama train`: model + data + LoRA + trainer, from one validated config, to an adapter directory."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import TrainingArguments, set_seed

from kllama.compat import peft_wrapped
from kllama.config import KllamaConfig, format_config
from kllama.config.kt_keys import usable_cpus
from kllama.errors import KllamaError
from kllama.experts.report import rule_training_note
from kllama.model.adapters import (
    attach_lora,
    load_adapter_weights,
    read_adapter_config,
    resolve_lora_spec,
    snapshot_adapter,
    spec_from_adapter,
)
from kllama.model.load import LoadedModel, load_model
from kllama.train.checkpoints import (
    WRITE_ERRORS,
    PublishCheckpoints,
    check_output_dir_writable,
    prepare_output_dir,
    resolve_resume,
    save_failed,
    staging_dir,
)
from kllama.train.distributed import (
    barrier,
    expert_memory_per_node,
    in_rank_order,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)
from kllama.train.health import TrainingHealth
from kllama.train.lockstep import LOCKSTEP_LINE, lockstep_for_run
from kllama.train.losses import REFERENCE_FREE
from kllama.train.micro_batching import BatchPlan, apply_micro_batching, expert_passes, reference_pass_budget
from kllama.train.mixed_precision import autocast_lora_branches, mixed_precision_dtype
from kllama.train.preflight import prepare_inputs
from kllama.train.packing import padding_free_for, prefix_sharing_for
from kllama.train.promotion import build_promotion
from kllama.train.trainer import (
    KllamaTrainer,
    PreferenceSettings,
    resolve_router_aux_coef,
    starting_adapter_reference,
)

TEMPLATE_FILE = "template.json"
# transformers renamed gradient_checkpointing* to activation_checkpointing* (the old names warn); use what exists.
CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in
                     {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")
RESOLVED_CONFIG_FILE = "training_args.yaml"


def preference_settings(config: KllamaConfig, model_config: Any = None) -> PreferenceSettings:
    """The loss settings of a config; with the model's transformers config, `router_aux_loss_coef: null` becomes the
    model's own coefficient (see `resolve_router_aux_coef`)."""
    f = config.finetuning
    return PreferenceSettings(
        stage=f.stage, loss_type=f.pref_loss, beta=f.pref_beta, label_smoothing=f.dpo_label_smoothing,
        simpo_gamma=f.simpo_gamma, discopop_tau=f.discopop_tau, ftx=f.pref_ftx, ld_alpha=f.ld_alpha,
        router_aux_loss_coef=resolve_router_aux_coef(config.model.router_aux_loss_coef, model_config),
    )


def dataloader_workers(requested: int) -> tuple[int, str | None]:
    """Data-loader worker processes for this machine: `requested`, at most the CPUs this process may use (more only
    compete for the same cores, and torch warns about them), and the line saying so when that clamps it."""
    available = usable_cpus()
    if requested <= available:
        return requested, None
    return available, (f"dataloader_num_workers: {requested} asked, this process may use {available} CPUs; "
                       f"using {available}")


def build_training_arguments(config: KllamaConfig, *, has_eval: bool, use_cpu: bool,
                             plan: BatchPlan | None = None) -> TrainingArguments:
    """transformers' TrainingArguments from kllama's training section (checkpoints go to the staging dir); a
    micro-batching `plan` replaces batch size and accumulation and keeps the rows in the order it gave them."""
    t = config.training
    merged = plan is not None
    warmup: float = t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio
    eval_strategy = t.eval_strategy if t.eval_strategy != "no" or not has_eval else "steps"
    report = [r for r in t.report_to if r not in ("none", "tensorboard")] or "none"
    return TrainingArguments(
        output_dir=str(staging_dir(t.output_dir)),
        per_device_train_batch_size=plan.batch if merged else t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.accumulation if merged else t.gradient_accumulation_steps,
        train_sampling_strategy="sequential" if merged else "random",  # LengthGroupedRows shuffles per epoch
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,
        fp16=t.fp16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=t.logging_first_step,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_only_model=t.save_only_model,
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=(t.eval_steps or t.logging_steps) if has_eval else None,
        report_to=report,
        run_name=t.run_name,
        **{CHECKPOINTING_ARG: t.gradient_checkpointing,
           f"{CHECKPOINTING_ARG}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None},
        dataloader_num_workers=dataloader_workers(t.dataloader_num_workers)[0],
        ddp_timeout=t.ddp_timeout,
        # Every LoRA parameter gets a gradient each step (expert LoRA through HostExperts' autograd function too):
        # DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        label_names=["labels"],
        logging_nan_inf_filter=False,  # a NaN loss must show (and stop the run), not be averaged away
    )


def _apply_adapters(config: KllamaConfig, loaded: LoadedModel) -> tuple[PeftModel, dict[str, torch.Tensor] | None]:
    """Attach the LoRA to train. Returns the PeftModel and, when continuing an adapter, its frozen starting weights
    (the DPO reference is the model *with* that adapter, not the bare base)."""
    f = config.finetuning
    model = loaded.model
    adapters = list(config.model.adapter_name_or_path or [])
    for path in adapters:
        read_adapter_config(path)  # clear error for a wrong path, before anything heavy
    seed = config.training.seed
    if adapters and (f.create_new_adapter or len(adapters) > 1):
        if loaded.engine is not None:
            raise KllamaError("create_new_adapter / several adapter_name_or_path: merging adapters into host-resident "
                              "experts is not supported yet with use_kt: true; train on one adapter or merge it with "
                              "kllama export first")
        merge = adapters if f.create_new_adapter else adapters[:-1]
        for path in merge:
            model = peft_wrapped(partial(PeftModel.from_pretrained, model, path)).merge_and_unload()
        adapters = [] if f.create_new_adapter else adapters[-1:]
    if adapters:
        spec = spec_from_adapter(model, adapters[0])
        peft_model = attach_lora(model, spec, seed=seed)
        load_adapter_weights(peft_model, adapters[0])
        return peft_model, snapshot_adapter(peft_model)
    spec = resolve_lora_spec(model, f.lora_target, f.lora_rank, f.lora_alpha, f.lora_dropout)
    return attach_lora(model, spec, seed=seed), None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_training(config: KllamaConfig) -> int:
    """Run `kllama train` end to end; returns the exit status.

    Order matters: everything that can be wrong (model directory and config, adapters, datasets, template,
    tokenization, weight files) is checked first; then `output_dir` is created and proved writable; then the weights
    load; only then is the previous run in `output_dir` replaced (with `overwrite_output_dir`) and training starts.
    """
    from kllama.data import PairwiseCollator, SFTCollator, describe_example, format_summary
    from kllama.train.reference import attach_reference_logps, weights_identity, with_reference_columns

    t, f = config.training, config.finetuning
    rank = init_distributed(t.ddp_timeout)
    set_seed(t.seed)
    output_dir = Path(t.output_dir)
    resume = resolve_resume(t.resume_from_checkpoint, output_dir)
    # rank 0 tokenizes (and rewrites the cache with overwrite_cache); the other ranks load its cache
    with in_rank_order(rank):
        inputs = prepare_inputs(config if rank.is_main else dataclasses.replace(
            config, data=dataclasses.replace(config.data, overwrite_cache=False)))
    tokenizer, bundle, cache_dir = inputs.tokenizer, inputs.bundle, inputs.cache_dir
    print(format_summary(bundle.summary), flush=True)
    if len(bundle.train):
        print(describe_example(tokenizer, bundle.train[0]), flush=True)
    if rank.is_main:
        check_output_dir_writable(output_dir)

    with expert_memory_per_node(rank, config.engine.use_kt):  # one host copy of the experts per node
        loaded = load_model(config, "train")
    if loaded.engine is not None and (note := rule_training_note(loaded.engine, t.micro_batch_tokens or 16384)):
        print(note, flush=True)

    model, start_snapshot = _apply_adapters(config, loaded)
    if (dtype := mixed_precision_dtype(t.bf16, t.fp16)) is not None:
        # before the reference log-probs are precomputed (a starting adapter's branches run there); the trainer
        # would do it too (KllamaTrainer), once
        autocast_lora_branches(model, loaded.device.type, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable LoRA parameters: {trainable:,}", flush=True)

    attention = getattr(loaded.model.config, "_attn_implementation", None)
    packed = padding_free_for(config, loaded.engine, attention)
    share = False
    if f.stage == "dpo":
        share = prefix_sharing_for(config, packed, attention)
        collate = PairwiseCollator(tokenizer.pad_token_id, pad_to_multiple_of=8, packed=packed, share_prompts=share)
        if share:
            print("prefix sharing: each packed pair's prompt runs once (its rejected answer attends to the chosen "
                  "sequence's prompt rows; prefix_sharing: false runs it twice)", flush=True)
    else:
        collate = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8, packed=packed)
    settings = preference_settings(config, loaded.model.config)
    reference_context = (lambda: starting_adapter_reference(model, start_snapshot)) if start_snapshot else None
    train_set, eval_set = bundle.train, bundle.eval
    if f.stage == "dpo" and f.precompute_ref_log_probs:
        ref_batch = f.precompute_ref_batch_size or t.per_device_eval_batch_size
        ref_budget = reference_pass_budget(config, loaded.engine, packed)
        weights = weights_identity(loaded.source.path, config.engine.expert_dtype)
        train_set = attach_reference_logps(model, train_set, collate, reference_context, cache_dir,
                                           batch_size=ref_batch, device=loaded.device, token_budget=ref_budget,
                                           packed=packed, shared=share, weights=weights)
        if eval_set is not None:
            eval_set = attach_reference_logps(model, eval_set, collate, reference_context, cache_dir,
                                              batch_size=ref_batch, device=loaded.device, token_budget=ref_budget,
                                              split="eval", packed=packed, shared=share, weights=weights)
        collate = with_reference_columns(collate)

    train_set, collate, plan = apply_micro_batching(config, loaded.engine, train_set, collate, packed, share)
    if rank.is_main:
        prepare_output_dir(output_dir, overwrite=t.overwrite_output_dir, resuming=resume is not None)
    barrier()
    args = build_training_arguments(config, has_eval=eval_set is not None, use_cpu=loaded.device.type == "cpu",
                                    plan=plan)
    clamped = dataloader_workers(t.dataloader_num_workers)[1]
    if clamped and is_main_process():
        print(clamped, flush=True)
    callbacks: list[Any] = [PublishCheckpoints(output_dir, t.save_total_limit)]
    if "tensorboard" in t.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=t.logging_dir or str(output_dir / "runs"))))
    lockstep = lockstep_for_run(
        loaded.model, stage=f.stage, reference_free=f.pref_loss in REFERENCE_FREE,
        precomputed=f.precompute_ref_log_probs, starting_adapter=start_snapshot is not None,
        streamed_layers=expert_passes(loaded.engine.placements)["stream"] if loaded.engine is not None else 0)
    if lockstep is not None and is_main_process():
        print(LOCKSTEP_LINE, flush=True)
    trainer = KllamaTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate,
        processing_class=tokenizer, callbacks=callbacks, settings=settings, reference_context=reference_context,
        health=TrainingHealth(output_dir),
        promotion=build_promotion(config, loaded.engine, loaded.device, train_set, plan, is_main_process(), share),
        lockstep=lockstep,
    )
    if resume is not None:
        load_adapter_weights(model, resume)  # expert LoRA too; the Trainer then restores optimiser/scheduler/RNG
        print(f"resuming from {resume}", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except WRITE_ERRORS as exc:
        if trainer.saves.current is None:
            raise
        raise save_failed(trainer.saves.current, exc, output_dir) from None

    metrics = dict(result.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    if rank.is_main:  # the other ranks hold the same weights
        try:
            _write_results(config, trainer, metrics, inputs.template.name, output_dir)
        except WRITE_ERRORS as exc:
            raise save_failed(output_dir, exc, output_dir) from None
        shutil.rmtree(staging_dir(output_dir), ignore_errors=True)
        print(f"adapter written to {output_dir}", flush=True)
    shutdown_distributed()
    return 0


def _write_results(config: KllamaConfig, trainer: KllamaTrainer, metrics: dict[str, Any], template_name: str,
                   output_dir: Path) -> None:
    """The finished run's files: adapter + tokenizer, trainer state, metrics, template, resolved config, plots."""
    from kllama.train.plots import plot_training

    trainer.save_model(str(output_dir))
    trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    _write_json(output_dir / "all_results.json", metrics)
    _write_json(output_dir / TEMPLATE_FILE, {"template": template_name})
    (output_dir / RESOLVED_CONFIG_FILE).write_text(format_config(config))
    if config.finetuning.plot_loss:
        for path in plot_training(trainer.state.log_history, output_dir):
            print(f"wrote {path}", flush=True)
