"""A training step out of GPU memory: rerun after demoting promoted layers (same result), else a clear error.

The out-of-memory error is raised once from a forward hook on an expert layer (CPU: the promotion copies the layer's
weights to the CPU compute device, a real `promote_layers` that costs nothing)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from kllama.errors import KllamaError
from kllama.train.oom_rerun import rerun_line

# on the CPU a promoted layer's `gpu` target runs on the CPU (and says so): that is this test's no-op promotion
pytestmark = pytest.mark.filterwarnings("ignore:.*expert target 'gpu' needs a CUDA compute device")

OOM = "CUDA out of memory. Tried to allocate 364.00 MiB. GPU 0 has a total capacity of 139.80 GiB"


class StepGrads(TrainerCallback):
    """Copies every trainable gradient right before each optimiser step."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads[state.global_step + 1] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.requires_grad}


class SubstepsDone(TrainerCallback):
    """The optimizer steps (1-based) in which an accumulation micro-step has finished."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def on_substep_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.steps.add(state.global_step + 1)


class PromoteAfterFirstStep(TrainerCallback):
    """Promotes one streamed layer after step 1, as `ResidentPromotion` does after a measured step."""

    def __init__(self, promotion) -> None:  # noqa: ANN001
        self.promotion = promotion

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == 1 and self.promotion.enabled:
            # on the CPU every layer runs `cpu` (nothing streams): any layer not resident is a candidate
            self.promotion.promote(1, "test promotion", candidates=list(self.promotion.engine.modules))


def run(model_dir: Path, out: Path, *, promote: bool, inject: str | None, accumulation: int = 1, times: int = 1,
        device: str = "cpu") -> tuple[list[float], dict[int, dict[str, torch.Tensor]], object]:
    """Two DPO steps of 2 pairs on the tiny model, LoRA dropout on (so the rerun needs the step's
    RNG state back); `promote` one layer after step 1, `inject` one out-of-memory error into step 2's first
    "forward" or "backward" through an expert layer (the backward: later layers' gradients already added), `times` times in a row. Returns the logged losses, each step's gradients and the promotion."""
    from transformers import set_seed

    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train.promotion import ResidentPromotion
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer

    config = build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(out), "stage": "dpo", "dataset": "dpo_en_demo",
        "template": "deepseek", "cutoff_len": 64, "max_samples": 8, "max_steps": 2, "logging_steps": 1,
        "per_device_train_batch_size": 2 // accumulation, "gradient_accumulation_steps": accumulation,
        "use_kt": True, "expert_placement": "stream", "lora_rank": 4, "lora_target": "o_proj", "seed": 3, "disable_tqdm": True,
        "learning_rate": 1e-3,
    })
    set_seed(3)
    loaded = load_model(config, "train", device=device)
    template = get_template("deepseek", loaded.tokenizer)
    bundle = build_dataset(config.data, loaded.tokenizer, template, stage="dpo", seed=3, cache_dir=None)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.2), seed=3)
    # budget 0: on CUDA its own measured-step estimate promotes nothing, only the test's promotion does
    promotion = ResidentPromotion(loaded.engine, loaded.device, budget=0, worst_tokens=1024, announce=False)
    grads = StepGrads()
    callbacks: list[TrainerCallback] = [grads] + ([PromoteAfterFirstStep(promotion)] if promote else [])
    trainer = KllamaTrainer(
        model=model, args=build_training_arguments(config, has_eval=False, use_cpu=loaded.device.type == "cpu"),
        train_dataset=bundle.train, data_collator=PairwiseCollator(loaded.tokenizer.pad_token_id),
        processing_class=loaded.tokenizer, callbacks=callbacks, settings=preference_settings(config),
        promotion=promotion if promote else None,
    )
    failed, substeps = [], SubstepsDone()
    trainer.add_callback(substeps)

    def fail_once(*_args):  # noqa: ANN002, ANN202
        # in step 2; with accumulation, once the step's first micro-step has added its gradients
        if trainer.state.global_step == 1 and len(failed) < times and (accumulation == 1 or 2 in substeps.steps):
            failed.append(True)
            raise torch.OutOfMemoryError(OOM)

    first_layer = next(iter(loaded.engine.modules.values()))
    if inject == "forward":
        first_layer.register_forward_pre_hook(fail_once)
    elif inject == "backward":
        first_layer.register_full_backward_pre_hook(fail_once)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, grads.grads, promotion


def test_a_step_out_of_memory_after_a_promotion_is_rerun_with_the_layers_demoted(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("deepseek_v2")
    losses, grads, _ = run(model_dir, tmp_path / "plain", promote=False, inject=None)
    capsys.readouterr()
    losses_r, grads_r, promotion = run(model_dir, tmp_path / "rerun", promote=True, inject="backward")
    printed = capsys.readouterr().out
    assert printed.count(rerun_line(2, 1)) == 1, printed[-2000:]
    # demoted: nothing promoted any more, every layer back on its placement, no resident copy, no further promotion
    assert promotion.promoted == [] and not promotion.enabled
    assert all(m.placement.mode == "cpu" and m._resident is None for m in promotion.engine.modules.values())
    # the rerun is the step that never failed: same loss (once logged), same gradients (RNG and grads put back)
    assert len(losses_r) == 2 and losses_r == pytest.approx(losses, abs=1e-6)
    assert grads_r.keys() == grads.keys() == {1, 2}
    for name, grad in grads[2].items():
        torch.testing.assert_close(grads_r[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_out_of_memory_with_nothing_promoted_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(KllamaError, match=r"training step 2 ran out of GPU memory \(CUDA out of memory\).*"
                                          r"micro_batch_tokens.*max_gpu_memory"):
        run(tiny_model_dir("deepseek_v2"), tmp_path / "none", promote=False, inject="forward")


def test_out_of_memory_after_gradients_accumulated_is_a_clear_error(tiny_model_dir, tmp_path):
    # the step's first micro-step already added its gradients: they cannot be put back, so no rerun
    with pytest.raises(KllamaError, match="training step 2 ran out of GPU memory"):
        run(tiny_model_dir("deepseek_v2"), tmp_path / "acc", promote=True, inject="forward", accumulation=2)


def test_a_rerun_out_of_memory_again_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(KllamaError, match="training step 2 ran out of GPU memory"):
        run(tiny_model_dir("deepseek_v2"), tmp_path / "twice", promote=True, inject="backward", times=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_out_of_memory_after_a_promotion_is_rerun_on_the_gpu(tiny_model_dir, tmp_path, capsys):
    # the CUDA side: a layer really resident, then streamed again through the (invalidated) slots, CUDA RNG put back
    model_dir = tiny_model_dir("deepseek_v2")
    losses, _, _ = run(model_dir, tmp_path / "plain", promote=False, inject=None, device="cuda")
    capsys.readouterr()
    losses_r, grads_r, promotion = run(model_dir, tmp_path / "rerun", promote=True, inject="backward", device="cuda")
    assert capsys.readouterr().out.count(rerun_line(2, 1)) == 1
    assert all(m.placement.mode == "stream" and m._resident is None for m in promotion.engine.modules.values())
    # CUDA attention's backward may sum in another order run to run: the same loss to its noise, not bit for bit
    assert len(losses_r) == 2 and losses_r == pytest.approx(losses, abs=1e-4)
    assert all(torch.isfinite(g).all() for g in grads_r[2].values())
