"""Typed configuration sections, one dataclass per concern, keyed by LLaMA-Factory's flat key names.

Every field carries its help text in `metadata["help"]`; `choices` where the value set is closed. A user's YAML is
flat (LLaMA-Factory style): the loader routes each key to the section that declares it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def arg(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (and optional closed set of choices) in its metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class ModelArguments:
    """Which model to load and how (LLaMA-Factory's ModelArguments)."""

    model_name_or_path: str | None = arg(None, "Path to a Hugging Face model directory (config.json + safetensors + tokenizer).")
    adapter_name_or_path: list[str] | None = arg(
        None, "LoRA adapter directories to load on top of the base model (comma-separated list); training continues the last one."
    )
    trust_remote_code: bool = arg(
        False, "Run the model directory's own Python code (auto_map); only for model types transformers lacks (native types such as deepseek_v2, qwen3_moe, mixtral always use transformers' class)."
    )
    cache_dir: str | None = arg(None, "Where tokenized datasets and reference log-probs are cached (default: <output_dir>/.cache or ~/.cache/kllama).")
    flash_attn: str = arg(
        "auto", "Attention implementation: auto (transformers' default), sdpa, eager, fa2 (flash_attention_2), disabled (= eager).",
        choices=("auto", "sdpa", "eager", "fa2", "disabled"),
    )
    infer_dtype: str = arg(
        "auto", "Weights dtype at inference: auto (checkpoint's dtype), float16, bfloat16, float32.",
        choices=("auto", "float16", "bfloat16", "float32"),
    )
    use_fast_tokenizer: bool = arg(True, "Use the fast (Rust) tokenizer.")
    enable_liger_kernel: bool = arg(
        False, "LLaMA-Factory: Liger's fused kernels (accepted, no effect: kllama always runs its own fused RMSNorm and, "
        "on a GPU, the routed experts' fused gated activation; Liger is not used).",
    )
    router_aux_loss_coef: float | None = arg(
        None, "MoE router load-balancing loss coefficient added to the training loss (None = the model config's router_aux_loss_coef, as TRL, for families that return router logits: Qwen-MoE, Mixtral, OLMoE; 0 = off)."
    )


@dataclass
class DataArguments:
    """Which data to train on and how to render it (LLaMA-Factory's DataArguments)."""

    dataset: list[str] | None = arg(None, "Dataset names (comma-separated) registered in <dataset_dir>/dataset_info.json.")
    eval_dataset: list[str] | None = arg(None, "Dataset names used for evaluation instead of a val_size split.")
    dataset_dir: str | None = arg(None, "Directory holding dataset_info.json and the data files (default: kllama's bundled data).")
    template: str = arg("auto", "Chat template: llama3, deepseek, deepseek3, qwen, qwen3, mistral, empty, or auto (the tokenizer's own chat_template).")
    cutoff_len: int = arg(2048, "Max tokens of prompt + response; longer pairs are truncated with LLaMA-Factory's rule.")
    max_samples: int | None = arg(None, "Use at most this many rows of each dataset.")
    val_size: float = arg(0.0, "Held-out evaluation split: a fraction in (0, 1) or a row count >= 1 (seeded).")
    overwrite_cache: bool = arg(False, "Re-tokenize even when a cache of tokenized data exists.")
    preprocessing_num_workers: int | None = arg(None, "Processes used to tokenize the dataset.")
    default_system: str | None = arg(None, "System prompt used when a row has none.")
    enable_thinking: bool = arg(True, "qwen3 template: render the reasoning block (False adds an empty <think></think>).")
    skip_invalid_rows: bool = arg(False, "Drop malformed rows (and count them) instead of stopping with an error listing them.")


@dataclass
class FinetuningArguments:
    """What to train (LLaMA-Factory's FinetuningArguments, LoRA part)."""

    stage: str = arg("sft", "Training stage: sft (supervised) or dpo (preference optimisation, any pref_loss).", choices=("sft", "dpo"))
    finetuning_type: str = arg("lora", "Only lora is supported.", choices=("lora",))
    lora_rank: int = arg(8, "LoRA rank r.")
    lora_alpha: int | None = arg(None, "LoRA alpha (scaling = alpha / r); default 2 x lora_rank.")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input.")
    lora_target: list[str] = arg(
        ["all"],
        "Modules that get LoRA: `all` (every linear layer except lm_head, dense-MLP and shared-expert ones included, plus "
        "the routed experts) or names such as "
        "q_proj,kv_b_proj,o_proj,gate_proj,up_proj,down_proj,experts (`experts` = routed experts' gate/up/down).",
    )
    additional_target: list[str] | None = arg(None, "Extra modules trained fully and saved with the adapter (e.g. embed_tokens).")
    create_new_adapter: bool = arg(False, "With adapter_name_or_path: merge the given adapters into the base and train a fresh one.")
    pref_beta: float = arg(0.1, "beta of the preference loss (the KL strength for DPO-style losses).")
    pref_loss: str = arg(
        "sigmoid", "Preference loss: sigmoid (DPO), hinge, ipo, orpo, simpo, robust, exo_pair, nca_pair, bco_pair, apo_zero, apo_down, sppo_hard, discopop.",
        choices=("sigmoid", "hinge", "ipo", "orpo", "simpo", "robust", "exo_pair", "nca_pair", "bco_pair",
                 "apo_zero", "apo_down", "sppo_hard", "discopop"),
    )
    pref_ftx: float = arg(0.0, "Weight of an SFT loss on the chosen responses added to the preference loss.")
    dpo_label_smoothing: float = arg(0.0, "Label smoothing (cDPO / robust); only with pref_loss sigmoid or robust.")
    simpo_gamma: float = arg(0.5, "SimPO target reward margin gamma.")
    discopop_tau: float = arg(0.05, "DiscoPOP temperature tau.")
    ld_alpha: float | None = arg(None, "LD-DPO: weight of response tokens beyond the shorter response's length (None = off).")
    precompute_ref_log_probs: bool = arg(
        False, "Compute the reference model's log-probs for the whole dataset once (cached on disk) and train without reference passes."
    )
    precompute_ref_batch_size: int | None = arg(
        None, "Batch size of the precompute pass (TRL's key). Unset: with routed experts held in host RAM (use_kt, streamed or on the CPU) the pairs run longest first in passes of up to 4 x micro_batch_tokens tokens (packed: up to 16,384 real tokens) (no gradients are kept there; each pass pays one copy of the weights), otherwise per_device_eval_batch_size at a time."
    )
    prefix_sharing: bool | None = arg(
        None, "Packed DPO-family passes (padding_free) compute each pair's prompt once: the rejected answer attends "
        "to the chosen sequence's prompt rows instead of repeating them (same log-probs, loss and gradients; the "
        "router aux loss counts the prompt once). Unset: on wherever passes are packed and the attention is sdpa "
        "(the seed DPO YAML on the H200 box: 1.03-1.055x unshared, 1.17x with precompute_ref_log_probs); true there, false to compute prompts twice."
    )
    plot_loss: bool = arg(False, "Write training_loss.png, training_rewards_*.png (and training_eval_loss.png) to output_dir.")


@dataclass
class TrainingArguments:
    """How to train (transformers' TrainingArguments names)."""

    output_dir: str | None = arg(None, "Where the adapter, checkpoints, logs and plots are written.")
    overwrite_output_dir: bool = arg(False, "Replace the previous run in a non-empty output_dir (its checkpoints, adapter and results are removed once the new run has checked its inputs and loaded the model).")
    do_train: bool = arg(True, "Run training.")
    do_eval: bool = arg(False, "Run evaluation on the validation split.")
    per_device_train_batch_size: int = arg(1, "Preference pairs (or SFT rows) per micro-step.")
    per_device_eval_batch_size: int = arg(1, "Pairs per evaluation micro-step.")
    gradient_accumulation_steps: int = arg(1, "Micro-steps per optimiser step.")
    learning_rate: float = arg(5.0e-5, "Peak learning rate.")
    num_train_epochs: float = arg(3.0, "Epochs over the training data (ignored when max_steps > 0).")
    max_steps: int = arg(-1, "Total optimiser steps; overrides num_train_epochs when > 0.")
    lr_scheduler_type: str = arg(
        "linear", "Learning-rate schedule (transformers' names).",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay"),
    )
    warmup_ratio: float = arg(0.0, "Fraction of the steps spent warming the learning rate up.")
    warmup_steps: int = arg(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm.")
    optim: str = arg("adamw_torch", "Optimiser (transformers' names).")
    bf16: bool = arg(False, "Compute in bfloat16 (mixed precision).")
    fp16: bool = arg(False, "Compute in float16 (mixed precision).")
    seed: int = arg(42, "Random seed (data order, LoRA init, splits).")
    logging_steps: int = arg(10, "Log metrics every N optimiser steps.")
    save_steps: int = arg(500, "Save a checkpoint every N optimiser steps.")
    save_strategy: str = arg("steps", "When to save checkpoints: steps, epoch, no.", choices=("steps", "epoch", "no"))
    logging_first_step: bool = arg(False, "Also log the first optimiser step.")
    save_total_limit: int | None = arg(None, "Keep at most this many checkpoints.")
    save_only_model: bool = arg(False, "Checkpoints hold only the adapter (no optimiser/scheduler/RNG state: cannot resume exactly).")
    resume_from_checkpoint: bool | str | None = arg(None, "A checkpoint directory to resume from, or `true` for the latest in output_dir.")
    report_to: list[str] = arg(["none"], "Where to log: none, tensorboard, wandb, mlflow (the last two need their package installed).")
    logging_dir: str | None = arg(None, "TensorBoard log directory (default <output_dir>/runs).")
    run_name: str | None = arg(None, "Run name shown by the loggers.")
    gradient_checkpointing: bool = arg(True, "Recompute activations in backward to save memory (on by default, as in LLaMA-Factory; `disable_gradient_checkpointing: true` turns it off).")
    eval_steps: int | None = arg(None, "Evaluate every N steps (default: logging_steps when a validation set exists).")
    eval_strategy: str = arg("no", "When to evaluate: no, steps, epoch (set to steps automatically when val_size > 0).", choices=("no", "steps", "epoch"))
    dataloader_num_workers: int = arg(0, "Worker processes for the data loader (more than the CPUs this process may use are clamped, with one line).")
    micro_batch_tokens: int = arg(
        16384, "With routed experts in host RAM (use_kt, streamed or on the CPU): token budget of one pass. The "
        "per_device_train_batch_size x gradient_accumulation_steps rows of an optimizer step run in as few passes as "
        "fit this many tokens each (padded, grouped by length; or real tokens when packed: padding_free; same gradient); "
        "0 = as written.",
    )
    padding_free: bool | None = arg(
        None, "Run each pass's sequences packed into one row without padding (TRL's key; position_ids restart per "
        "sequence, attention stays within each sequence, same numbers as padded). Unset: packed when routed experts "
        "are held in host RAM (use_kt, streamed or on the CPU) and the attention is sdpa, eager, fa2 or flex "
        "(1.13x the padded seed DPO YAML on the H200 box); micro_batch_tokens then counts real tokens.",
    )
    ddp_timeout: int = arg(1800, "Timeout in seconds of distributed collectives in a data-parallel run (single-process runs ignore it).")
    disable_tqdm: bool = arg(False, "Hide progress bars.")


@dataclass
class EngineArguments:
    """The expert engine (KTransformers' keys in LLaMA-Factory, plus kllama's own)."""

    use_kt: bool = arg(False, "Keep routed experts in host RAM and run them with kllama's expert engine.")
    kt_optimize_rule: str | None = arg(None, "Rule file placing each layer's experts (KTransformers' format or kllama's own).")
    cpu_infer: int | None = arg(None, "CPU threads for expert compute (default: physical cores; more than this process may use are clamped, with one line).")
    chunk_size: int = arg(8192, "Max tokens per CPU expert call.")
    expert_placement: str = arg(
        "auto", "Placement when no rule decides: cpu, stream, gpu, auto (CPU for short inputs, streamed to GPU for long ones).",
        choices=("cpu", "stream", "gpu", "auto"),
    )
    max_gpu_memory: str | None = arg(None, "GPU memory budget, e.g. 24GB: routed experts stay resident while it allows.")
    gpu_memory_utilization: float = arg(
        0.9, "Inference (chat, api) without max_gpu_memory (vLLM's key and default): once the KV cache is allocated, "
        "layers placed auto keep their routed experts resident on the GPU, bottom layers first, while this fraction "
        "of the GPU's total memory allows (less what other processes hold and a reserve for a long prefill); the "
        "rest run as placed (CPU decode, streamed prefill). 0 = none resident. Training ignores it (max_gpu_memory "
        "sets its budget).",
    )
    decode_compile: bool = arg(
        False, "Inference (chat, api): capture one-sequence decode steps with the attention, norm and router modules "
        "compiled by torch.compile (Inductor), fusing their small GPU kernels: 1.10x decode with experts on the GPU "
        "on the H200 box (V2-Lite; chat 140 tok/s), less with CPU experts. The first capture compiles (27-45 s "
        "there) and a step reading a longer stretch of the cache compiles again; steps of more sequences, prefill "
        "and training are not compiled. Off by default (start-up time).",
    )
    expert_dtype: str = arg(
        "auto", "How routed experts are held in host RAM: bf16 (not quantized: the model's weights dtype), int8 "
        "(per output channel; fast CPU decode and prefill), fp8 (e4m3, 128x128 block scales; streamed passes copy "
        "half the bytes of bf16, CPU decode as fast as int8), int4 (symmetric, round-to-nearest, one scale per row "
        "and group of 64 inputs: a quarter of bf16's bytes in RAM and over PCIe, for models that do not fit "
        "otherwise; it costs more quality than int8/fp8: check yours, benchmarks/NOTES.md has measurements), or "
        "auto (an fp8 checkpoint's experts stay fp8 as stored, others are not quantized; never int4). "
        "Quantized weights are dequantized on the GPU for streamed/resident passes; LoRA stays in full precision.",
        choices=("auto", "bf16", "fp8", "int8", "int4"),
    )
    # LLaMA-Factory's KTransformersArguments (kllama.config.kt_keys says what each does here)
    kt_cpu_activation: str | None = arg(
        None, "KTransformers: retain or recompute CPU expert activations under gradient checkpointing. kllama "
        "recomputes them with the layer when gradient_checkpointing is on and keeps them when it is off.",
        choices=("retain", "recompute"),
    )
    kt_weight_path: str | None = arg(None, "KTransformers: pre-quantised INT8 expert files (accepted, no effect: kllama reads the experts from model_name_or_path; expert_dtype: int8 quantizes them at load).")
    kt_non_expert_weight_path: str | None = arg(None, "KTransformers: BF16 non-expert cache for INT8 experts (accepted, no effect).")
    kt_expert_checkpoint_path: str | None = arg(None, "KTransformers: expert checkpoint for online conversion (accepted, no effect).")
    kt_use_lora_experts: bool | None = arg(None, "KTransformers: extra GPU-side LoRA experts (accepted, no effect: kllama's expert LoRA is on the routed experts, see lora_target).")
    kt_lora_expert_num: int | None = arg(None, "KTransformers: number of GPU-side LoRA experts (accepted, no effect).")
    kt_lora_expert_intermediate_size: int | None = arg(None, "KTransformers: width of GPU-side LoRA experts (accepted, no effect).")
    kt_config: dict[str, Any] | None = arg(
        None, "KTransformers kernel settings (a mapping): kt_num_threads sets the expert CPU threads when cpu_infer "
        "is not given; kt_expert_weight_format, kt_backend, kt_tp_enabled, kt_threadpool_count, kt_max_cache_depth, "
        "kt_weight_lifecycle (and LLaMA-Factory's other kt_config keys) are accepted without effect.",
    )


@dataclass
class GenerationArguments:
    """How `kllama chat` and `kllama api` generate."""

    infer_backend: str = arg(
        "huggingface", "huggingface (stock transformers on the device) or ktransformers (kllama's expert engine).",
        choices=("huggingface", "ktransformers"),
    )
    do_sample: bool = arg(True, "Sample (False = greedy).")
    temperature: float = arg(0.95, "Sampling temperature.")
    top_p: float = arg(0.7, "Nucleus sampling probability mass.")
    top_k: int = arg(50, "Sample among the k most likely tokens.")
    max_new_tokens: int = arg(1024, "Max tokens generated per answer.")
    kt_maxlen: int = arg(
        4096, "Max prompt + answer tokens of one sequence in kllama chat / api (LLaMA-Factory's KTransformers key; "
        "both backends): the positions of each KV-cache slot, allocated at start for every sequence decoded "
        "together (capped at the model's max_position_embeddings; left unset on a GPU, lowered to what fits).",
    )
    repetition_penalty: float = arg(1.0, "Penalty > 1 discourages repeating tokens.")
    stop: list[str] | None = arg(None, "Stop strings (comma-separated) that end an answer.")
    system: str | None = arg(None, "System prompt for `kllama chat`.")


@dataclass
class ExportArguments:
    """`kllama export`: merge the adapter into the base weights."""

    export_dir: str | None = arg(None, "Where the merged checkpoint is written.")
    export_size: int = arg(5, "Max GB per safetensors shard of an in-memory merge; the default streamed merge writes "
                              "one shard per source shard, with the source's names.")
    export_device: str = arg("cpu", "Device used for an in-memory merge: cpu or auto (the streamed merge runs on the "
                                    "CPU).", choices=("cpu", "auto"))
    export_legacy_format: bool = arg(False, "Write .bin instead of safetensors (not supported: kept for compatibility).")


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "training": TrainingArguments,
    "engine": EngineArguments,
    "generation": GenerationArguments,
    "export": ExportArguments,
}
