"""The preference / SFT trainer: transformers' Trainer with kllama's loss, metrics and adapter saving.

Only public Trainer hooks are overridden: `compute_loss`, `training_step` (a step out of GPU memory:
`kllama.train.oom_rerun`), `prediction_step`, `log`, `save_model`; training health (non-finite loss or gradient,
dead gradient) is a TrainerCallback (`kllama.train.health`).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import psutil
import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer

from kllama.data.collate import batch_sequences, data_tokens, is_packed
from kllama.model.adapters import adapter_weights_swapped, adapters_disabled, save_adapter
from kllama.train.checkpoints import SaveTracker
from kllama.train.distributed import combine_rank_metrics, decoder_outputs, unwrap
from kllama.train.health import TrainingHealth
from kllama.train.lockstep import LockstepReference
from kllama.train.logprobs import IGNORE_INDEX, logit_transform_for, logits_chunk_tokens, sequence_logps
from kllama.train.losses import (
    NEEDS_AVERAGED_LOGPS,
    REFERENCE_FREE,
    RunningMean,
    bco_batch_reward,
    preference_loss,
    sft_term,
)
from kllama.train.packing import SEQUENCE_BOUNDS, SEQUENCE_PREFIXES, use_per_sequence_sdpa
from kllama.train.micro_batching import planned_pass_tokens
from kllama.train.mixed_precision import WholeModelAutocastOff, autocast_lora_branches, mixed_precision_dtype
from kllama.train.oom_rerun import StepStart, can_rerun, out_of_memory_error, rerun_line
from kllama.train.promotion import ResidentPromotion


@dataclass(frozen=True)
class PreferenceSettings:
    """The loss settings the trainer needs (from the finetuning section of the config)."""

    stage: str = "dpo"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    ftx: float = 0.0
    ld_alpha: float | None = None
    router_aux_loss_coef: float | None = None
    logps_chunk_tokens: int | None = None  # None: `logits_chunk_tokens` of the model's vocab


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM module inside a PeftModel (LoRA layers are injected in place), DDP-wrapped or not."""
    model = unwrap(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def policy_logps(model: nn.Module, batch: dict[str, torch.Tensor], settings: PreferenceSettings,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed label log-probs `[N]`, label counts `[N]` (one per sequence) and the router aux loss (or None) of a
    padded or packed batch, computed from the decoder's last hidden states in chunks (no [tokens x vocab] fp32
    logits). A packed batch runs with its `position_ids` and no attention mask (`kllama.data.collate.pack_batch`),
    and with its `sequence_prefixes` when it shares prompts (`prefix_sharing`). With shared prompts the router aux
    loss counts each pair's prompt tokens once, not twice (the DPO log-probs are those of the unshared batch)."""
    lm = causal_lm_of(model)
    want_router = bool(settings.router_aux_loss_coef)
    kwargs = {"output_router_logits": True} if want_router else {}
    if is_packed(batch):
        use_per_sequence_sdpa()
        kwargs |= {"position_ids": batch["position_ids"], SEQUENCE_BOUNDS: batch["sequence_bounds"]}
        if "sequence_prefixes" in batch:
            kwargs[SEQUENCE_PREFIXES] = batch["sequence_prefixes"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    out = decoder_outputs(model, lm, input_ids=batch["input_ids"], use_cache=False, **kwargs)
    sums, counts = hidden_logps(out.last_hidden_state, lm, batch, settings)
    aux = None
    if want_router:
        # a packed row has no padding: every token counts, as the padded batch's mask counts its real tokens
        mask = torch.ones_like(batch["input_ids"]) if is_packed(batch) else batch["attention_mask"]
        aux = router_aux_loss(lm, out, mask)
    return sums, counts, aux


def hidden_logps(hidden: torch.Tensor, lm: nn.Module, batch: dict[str, torch.Tensor], settings: PreferenceSettings,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs `[N]` and label counts `[N]` of a batch's N sequences from the decoder's last hidden
    states `[rows, T, H]` (after its final norm), in chunks through `lm`'s head."""
    vocab = getattr(lm.lm_head, "out_features", None) or lm.config.vocab_size
    return sequence_logps(
        hidden, lm.lm_head, batch["labels"], chunk_tokens=settings.logps_chunk_tokens or logits_chunk_tokens(vocab),
        ld_alpha=settings.ld_alpha if settings.stage == "dpo" else None, transform=logit_transform_for(lm.config),
        sequence_index=batch.get("sequence_index"),
    )


def resolve_router_aux_coef(user_value: float | None, model_config: Any) -> float | None:
    """The router load-balancing coefficient a run uses: the user's `router_aux_loss_coef` when set, else (as TRL)
    the model config's own `router_aux_loss_coef` for families that return router logits (their config has
    `output_router_logits`); None or 0 = no aux loss."""
    if user_value is not None:
        return user_value
    if model_config is None or not hasattr(model_config, "output_router_logits"):
        return None
    return getattr(model_config, "router_aux_loss_coef", None) or None


def router_aux_loss(lm: nn.Module, out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss from the decoder's router logits (families that expose them)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from kllama.errors import KllamaError

    logits = getattr(out, "router_logits", None)
    if not logits:
        raise KllamaError(f"router_aux_loss_coef: model type {lm.config.model_type!r} does not return router logits; set router_aux_loss_coef: 0")
    cfg = lm.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    return load_balancing_loss_func(logits, experts, cfg.num_experts_per_tok, attention_mask)


class KllamaTrainer(Trainer):
    """Trainer for `stage: sft` and `stage: dpo` (every `pref_loss`), with LoRA adapters saved in PEFT's format."""

    def __init__(self, *args: Any, settings: PreferenceSettings,
                 reference_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 health: TrainingHealth | None = None, promotion: ResidentPromotion | None = None,
                 lockstep: LockstepReference | None = None, **kwargs: Any):
        if lockstep is not None and reference_context is not None:
            raise ValueError("a lock-step reference is the policy with adapters off, not a starting-adapter reference")
        super().__init__(*args, **kwargs)
        # the DPO reference computed inside the policy's forward, layer by layer (train.lockstep), or None: own pass
        self.lockstep = lockstep
        self.health = health or TrainingHealth()
        self.add_callback(self.health)
        self.promotion = promotion  # more resident expert layers once a step is measured (train.promotion)
        if promotion is not None:
            self.add_callback(promotion)
        self.saves = SaveTracker()
        self.add_callback(self.saves)
        # mixed precision: the LoRA branches autocast, the frozen layers compute as loaded (train.mixed_precision)
        if (dtype := mixed_precision_dtype(self.args.bf16, self.args.fp16)) is not None:
            autocast_lora_branches(self.model, self.args.device.type, dtype)
            self.add_callback(WholeModelAutocastOff(lambda: (self.accelerator, self.model_wrapped)))
        # DPO-family losses are per-pair means of a micro-batch: with this False the Trainer divides each one by the
        # accumulation steps, so equal micro-batches give the step's per-pair mean however its rows are split.
        # SFT's loss is a token mean over the whole optimizer step: with this True the Trainer counts the step's
        # label tokens (`num_items_in_batch`), `_sft_loss` divides by them and the Trainer does not divide again
        # (what stock transformers does for causal LMs), so merged and accumulated micro-batches agree.
        self.model_accepts_loss_kwargs = settings.stage == "sft"
        self.settings = settings
        self._reference_context = reference_context
        self._stored: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._bco = RunningMean()
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()

    # ---------------------------------------------------------------- losses
    def reference_context(self) -> contextlib.AbstractContextManager:
        """Where the reference model lives: the policy with adapters off, or with the starting adapter swapped in."""
        if self._reference_context is not None:
            return self._reference_context()
        return adapters_disabled(self.model)

    def _dpo_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        # LD-DPO weights the policy's tokens only; the reference keeps plain sums (as LLaMA-Factory).
        plain = replace(s, ld_alpha=None, router_aux_loss_coef=None)
        needs_reference = s.loss_type not in REFERENCE_FREE and "ref_chosen_logps" not in batch
        ref_sums = None
        if needs_reference and self.lockstep is not None:
            with self.lockstep.following() as reference_hidden:
                sums, counts, aux = policy_logps(model, batch, s)
            with torch.no_grad():
                ref_sums, _ = hidden_logps(reference_hidden(), causal_lm_of(model), batch, plain)
        else:
            sums, counts, aux = policy_logps(model, batch, s)
        half = sums.shape[0] // 2
        averaged = s.loss_type in NEEDS_AVERAGED_LOGPS
        logps = sums / counts.clamp(min=1) if averaged else sums  # [2B]
        chosen, rejected = logps[:half], logps[half:]
        ref_chosen = ref_rejected = None
        if s.loss_type not in REFERENCE_FREE:
            if "ref_chosen_logps" in batch:
                ref_sums = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(sums)
            elif ref_sums is None:
                with torch.no_grad(), self.reference_context():
                    ref_sums, _, _ = policy_logps(model, batch, plain)
            ref = ref_sums / counts.clamp(min=1) if averaged else ref_sums
            ref_chosen, ref_rejected = ref[:half], ref[half:]
        bco_delta = None
        if s.loss_type == "bco_pair":
            rewards = s.beta * (torch.cat([chosen, rejected]) - torch.cat([ref_chosen, ref_rejected])).detach()
            bco_delta = self._bco.update(bco_batch_reward(rewards[:half], rewards[half:])) if model.training else self._bco.mean
        losses, chosen_rewards, rejected_rewards = preference_loss(
            s.loss_type, chosen, rejected, ref_chosen, ref_rejected, beta=s.beta, label_smoothing=s.label_smoothing,
            simpo_gamma=s.simpo_gamma, discopop_tau=s.discopop_tau, bco_delta=bco_delta,
        )
        if s.ftx > 0:
            losses = losses + s.ftx * sft_term(sums[:half], counts[:half])
        loss = losses.mean()
        if aux is not None:
            loss = loss + s.router_aux_loss_coef * aux
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": sums[:half].detach().mean().item(),
            "logps/rejected": sums[half:].detach().mean().item(),
        }
        if aux is not None:
            metrics["router_aux_loss"] = aux.item()
        return loss, metrics

    def _sft_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step_tokens: Any = None,
                  aux_share: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Token-mean NLL; over the optimizer step's `step_tokens` label tokens in training (the Trainer then
        adds the micro-steps up without dividing), over this batch's own tokens in evaluation. The router aux loss
        is weighted by `aux_share` (a pass's share of the step's rows) when given, else averaged over the Trainer's
        micro-steps."""
        sums, counts, aux = policy_logps(model, batch, self.settings)
        per_step = step_tokens is not None
        denominator = torch.as_tensor(step_tokens, device=sums.device) if per_step else counts.sum()
        loss = -sums.sum() / denominator.clamp(min=1)
        if per_step and model.training and self.args.average_tokens_across_devices:
            # in training the step's token count covers every rank and DDP averages the ranks' gradients: scale
            # back up (as stock `Trainer.compute_loss` does), so N ranks give the token mean of one process
            loss = loss * self.accelerator.num_processes
        if aux is not None:
            # the aux loss is a per-micro-batch statistic: average it over the step's micro-batches
            if aux_share is not None:
                weight = self.settings.router_aux_loss_coef * aux_share
            else:
                weight = self.settings.router_aux_loss_coef / (self.current_gradient_accumulation_steps if per_step else 1)
            loss = loss + weight * aux
        return loss, {}

    def _loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step_tokens: Any = None,
              ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.settings.stage == "dpo":
            return self._dpo_loss(model, batch)
        return self._sft_loss(model, batch, step_tokens)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if "chunks" in inputs:  # one optimizer step's rows in several passes (train.micro_batching)
            loss = self._step_in_passes(model, inputs["chunks"])
        else:
            loss, metrics = self._loss(model, inputs, num_items_in_batch if model.training else None)
            self._record("train", inputs, metrics)
        if model.training:
            self.health.record_loss(loss)
        return (loss, None) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None,
                      ) -> torch.Tensor:
        """Stock training step; one that runs out of GPU memory after a promotion is run again with the promoted
        layers demoted (`kllama.train.oom_rerun`), any other out-of-memory ends the run with a clear error."""
        # only a step with promoted layers can be run again: the others skip the capture (RNG states, a parameter walk)
        promoted = self.promotion is not None and bool(self.promotion.promoted)
        start = StepStart.capture(model, self._bookkeeping()) if promoted else None
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except torch.OutOfMemoryError as exc:
            step = self.state.global_step + 1
            if start is None or not can_rerun(start, self.promotion, self.accelerator.num_processes):
                raise out_of_memory_error(step, exc) from None
        # here, outside the except block, the failed attempt's tensors (held by its traceback) are freed
        assert self.promotion is not None and start is not None
        demoted = self.promotion.demote_all()
        start.restore(model)
        self._restore_bookkeeping(start.bookkeeping)
        print(rerun_line(step, len(demoted)), flush=True)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except torch.OutOfMemoryError as exc:  # out of memory with nothing promoted either
            raise out_of_memory_error(step, exc) from None

    def _bookkeeping(self) -> tuple[dict[str, int], int, int, tuple[float, int]]:
        """The trainer's per-step records as they stand (metric counts, tokens, health losses, bco_pair's mean)."""
        return ({key: len(values) for key, values in self._stored["train"].items()}, self._tokens_since_log,
                self.health.recorded_losses(), (self._bco.mean, self._bco.count))

    def _restore_bookkeeping(self, saved: tuple[dict[str, int], int, int, tuple[float, int]]) -> None:
        """Back to the records of `_bookkeeping` (a step that is run again records itself once)."""
        counts, self._tokens_since_log, losses, (self._bco.mean, self._bco.count) = saved
        for key, values in self._stored["train"].items():
            del values[counts.get(key, 0):]
        self.health.forget_losses_after(losses)

    def _record(self, split: str, batch: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        """Store a batch's metrics once per row (so means over passes of different sizes are means over rows)."""
        rows = self._rows(batch)
        if split == "train":
            # the tokens the data holds: a prefix-shared pass's prompts count for both answers, as unshared
            self._tokens_since_log += data_tokens(batch)
            if self.promotion is not None:
                self.promotion.observe_pass(planned_pass_tokens(batch))
        for key, value in metrics.items():
            self._stored[split][key].extend([value] * rows)

    def _rows(self, batch: dict[str, torch.Tensor]) -> int:
        sequences = batch_sequences(batch)
        return sequences // 2 if self.settings.stage == "dpo" else sequences

    def _pass_losses(self, model: nn.Module, chunks: list[dict[str, torch.Tensor]], split: str,
                     ) -> Iterator[torch.Tensor]:
        """Each pass's share of the step's loss: a DPO-family pass's per-pair mean x its share of the step's pairs;
        an SFT pass's label log-likelihood over the step's label tokens."""
        total_rows = sum(self._rows(c) for c in chunks)
        label_tokens = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in chunks)
        if split == "train" and self.settings.stage == "sft" and self.args.average_tokens_across_devices:
            label_tokens = self._all_ranks_sum(label_tokens)  # every rank's, as the Trainer's num_items_in_batch
        for chunk in chunks:
            if self.settings.stage == "dpo":
                loss, metrics = self._dpo_loss(model, chunk)
                loss = loss * (self._rows(chunk) / total_rows)
            else:
                loss, metrics = self._sft_loss(model, chunk, label_tokens, aux_share=self._rows(chunk) / total_rows)
            self._record(split, chunk, metrics)
            yield loss

    def _all_ranks_sum(self, value: int) -> int:
        """`value` summed over the data-parallel ranks (itself in a single process)."""
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.reduce(torch.tensor(value, device=self.args.device), reduction="sum"))

    def _step_in_passes(self, model: nn.Module, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward every pass but the last here (outside gradient synchronisation), and return the
        last pass's loss plus the earlier ones' values: the Trainer's backward of it completes the step's gradient,
        which equals that of all the step's rows in one batch.

        DDP decides during the forward whether the backward all-reduces, so an earlier pass runs its forward too
        under `no_sync`: each rank then all-reduces once per step, however many passes its rows need."""
        done = None
        losses = self._pass_losses(model, chunks, "train")
        for index in range(len(chunks)):
            if index == len(chunks) - 1:
                loss = next(losses)
                return loss if done is None else loss + done
            with self.accelerator.no_sync(model):
                loss = next(losses)
                self.accelerator.backward(loss)
            done = loss.detach() if done is None else done + loss.detach()
        raise ValueError("a step without rows")

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            if "chunks" in inputs:
                loss = torch.stack(list(self._pass_losses(model, inputs["chunks"], "eval"))).sum()
            else:
                loss, metrics = self._loss(model, inputs)
                self._record("eval", inputs, metrics)
        return loss.detach(), None, None

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if "eval_loss" in logs else "train"
        prefix = "eval_" if split == "eval" else ""
        ours = {prefix + key: sum(values) / len(values) for key, values in self._stored[split].items() if values}
        counts = {prefix + key: len(values) for key, values in self._stored[split].items() if values}
        self._stored[split].clear()
        if split == "train" and "loss" in logs:
            now = time.perf_counter()
            ours["tokens_per_second"] = round(self._tokens_since_log / max(now - self._last_log_time, 1e-9), 1)
            self._tokens_since_log, self._last_log_time = 0, now
            ours["peak_host_memory_gb"] = round(peak_host_bytes() / 1e9, 3)
            if torch.cuda.is_available():
                peak = (self.promotion.run_peak_allocated() if self.promotion is not None
                        else torch.cuda.max_memory_allocated())
                ours["peak_gpu_memory_gb"] = round(peak / 1e9, 3)
        logs.update(combine_rank_metrics(ours, counts))  # every rank logs here: one number over all ranks
        super().log(logs, start_time)

    # ---------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        out = output_dir or self.args.output_dir
        if _internal_call:  # the Trainer starts a checkpoint
            self.saves.begin(out)
        if not self.args.should_save:  # rank 0 writes; the others' weights are the same
            return
        save_adapter(self.model, out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)


def peak_host_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak_kb * 1024, psutil.Process().memory_info().rss)


@contextlib.contextmanager
def starting_adapter_reference(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
    """Reference = the model with the adapter training started from (frozen snapshot)."""
    with adapter_weights_swapped(model, snapshot):
        yield
