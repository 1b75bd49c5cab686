"""LLaMA-Factory / transformers keys kllama recognises but does not support yet, and keys it renames."""
from __future__ import annotations

from typing import Any, Callable

# key -> why / what to do instead. These get "not supported yet", never "unknown key".
UNSUPPORTED: dict[str, str] = {
    "quantization_bit": "quantised non-expert base weights (QLoRA) are not implemented; routed experts can be held "
                        "in int8, int4 or fp8 with expert_dtype",
    "quantization_method": "quantised base weights are not implemented",
    "double_quantization": "quantised base weights are not implemented",
    "rope_scaling": "context extension is not implemented",
    "use_unsloth": "unsloth kernels are not used by kllama",
    "use_unsloth_gc": "unsloth kernels are not used by kllama",
    "deepspeed": "kllama runs one process with its expert engine instead of DeepSpeed",
    "fsdp": "kllama runs one process with its expert engine instead of FSDP",
    "fsdp_config": "kllama runs one process with its expert engine instead of FSDP",
    "shift_attn": "S^2-Attn is not implemented",
    "mixture_of_depths": "mixture-of-depths conversion is not implemented",
    "neftune_noise_alpha": "NEFTune is not implemented",
    "use_galore": "GaLore is not implemented (finetuning_type: lora only)",
    "use_badam": "BAdam is not implemented (finetuning_type: lora only)",
    "use_apollo": "APOLLO is not implemented (finetuning_type: lora only)",
    "use_adam_mini": "Adam-mini is not implemented",
    "pissa_init": "PiSSA initialisation is not implemented",
    "pissa_convert": "PiSSA conversion is not implemented",
    "use_dora": "DoRA is not implemented for the expert engine",
    "use_rslora": "rsLoRA scaling is not implemented",
    "loraplus_lr_ratio": "LoRA+ is not implemented",
    "freeze_trainable_layers": "finetuning_type freeze is not implemented",
    "freeze_trainable_modules": "finetuning_type freeze is not implemented",
    "freeze_extra_modules": "finetuning_type freeze is not implemented",
    "use_llama_pro": "LLaMA Pro is not implemented",
    "pure_bf16": "pure bf16 training is not implemented; use bf16: true (mixed precision)",
    "ref_model": "a separate reference model is not supported: the reference is the policy with adapters disabled",
    "ref_model_adapters": "a separate reference model is not supported: the reference is the policy with adapters disabled",
    "ref_model_quantization_bit": "a separate reference model is not supported",
    "reward_model": "reward-model stages (ppo) are not implemented",
    "reward_model_type": "reward-model stages (ppo) are not implemented",
    "kto_chosen_weight": "stage kto is not implemented",
    "kto_rejected_weight": "stage kto is not implemented",
    "packing": "sequence packing is not implemented",
    "neat_packing": "sequence packing is not implemented",
    "streaming": "streaming datasets are not implemented",
    "mix_strategy": "dataset mixing strategies other than concatenation are not implemented",
    "interleave_probs": "dataset interleaving is not implemented",
    "tokenized_path": "kllama caches tokenized data itself (see overwrite_cache)",
    "mask_history": "masking history turns is not implemented",
    "train_on_prompt": "training on prompt tokens is not implemented",
    "tool_format": "tool-call formats are not implemented",
    "do_predict": "batch prediction is not implemented; use kllama api",
    "predict_with_generate": "batch prediction is not implemented; use kllama api",
    "vllm_maxlen": "infer_backend vllm is not implemented",
    "vllm_gpu_util": "infer_backend vllm is not implemented",
    "vllm_enforce_eager": "infer_backend vllm is not implemented",
    "export_quantization_bit": "quantised export is not implemented",
    "export_quantization_dataset": "quantised export is not implemented",
    "export_hub_model_id": "pushing to the hub is not possible offline; upload export_dir yourself",
    "push_to_hub": "pushing to the hub is not implemented",
    "load_best_model_at_end": "best-model selection is not implemented",
    "metric_for_best_model": "best-model selection is not implemented",
    "kt_use_cuda_graph": "no switch: kllama replays decode steps as CUDA graphs whenever the model is on a CUDA device",
    "kt_mode": "kllama picks CPU/stream/GPU per pass itself (see expert_placement)",
    "image_max_pixels": "multimodal data is not supported",
    "video_max_pixels": "multimodal data is not supported",
    "use_cache": "the KV cache is managed by kllama",
}


def _negate(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "false"
    return value  # let the type check report it


def _same(value: Any) -> Any:
    return value


# old or LLaMA-Factory name -> (kllama field, value converter)
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "moe_aux_loss_coef": ("router_aux_loss_coef", _same),
    "disable_gradient_checkpointing": ("gradient_checkpointing", _negate),
    "evaluation_strategy": ("eval_strategy", _same),
    "dpo_beta": ("pref_beta", _same),
    "dpo_loss": ("pref_loss", _same),
    "dpo_ftx": ("pref_ftx", _same),
}
