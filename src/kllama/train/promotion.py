"""More resident expert layers once a training step has been measured.

At load, `max_gpu_memory` keeps a fixed reserve free for a step's activations (`promote_resident_layers`: 60 % of
the budget, at least 8 GiB), because nothing has run yet. On the seed YAML under a 24 GB cap that left ~4 GB of the
cap unused (peak 19.7 GB, V2-Lite): more of the ~1.1 GB layers, each of which a step otherwise copies twice (lock-step
reference). So after a step has run, `ResidentPromotion` reads what the step really used and makes more layers
resident in what is left, while worst step + margin + the promoted layers' bytes stay within the budget:

    worst step = allocated between steps (weights, stream slots, LoRA, optimiser state)
               + activations of the largest pass the run makes (`worst_tokens`: the real largest pass of the
                 epochs the run sees, from the data and micro_batch_tokens; scaled from the measured passes when
                 none was that large, see `activation_bytes`)
    margin     = the allocator's fragmentation (`fragmentation_bytes`: reserved but unusable bytes at the fullest
                 measured step's peak, grown with the activations, and never below the floor, a share of the
                 worst step's allocation: `FRAGMENTATION_FLOOR`, 10 % with torch's default allocator, 3 % with
                 expandable segments, which `kllama train` sets: `kllama.train.allocator`)
               + a safety margin (`safety_margin`)

The micro-batched order runs the step of each epoch's largest pass first (`kllama.train.micro_batching`), so step 1
measures the worst pass itself and the promotion comes right after it; before that order the first steps were small
(~6-10k tokens), were scaled in proportion to a 16,384-token bound, which over-estimates, and nothing was promoted in
a 40-step run.

The cap is enforced on the caching allocator's *reserved* memory (`set_per_process_memory_fraction`), so the
fragmentation term counts against it. With the default allocator the first steps under-show it: after a promotion on
the seed YAML (24 GB cap, V2-Lite) step 8 died with 20.28 GiB allocated but 22.04 GiB reserved (1.76 GiB of holes,
8.7 % of the allocation) and a 364 MiB request that fit in none of them, under a 22.35 GiB cap, although the steps
measured before had predicted 1 GiB to spare. Hence the 10 % floor. With expandable segments a free page between
live blocks is unmapped and reused when the cap is reached, so only partly used pages are lost: a 3 % floor, the
measured fragmentation (reserved above allocated at the peaks; torch leaves expandable segments out of
`inactive_split_bytes`) still counting when larger. The safety margin covers what one step cannot show: other pass
shapes at the same token count (rows x length: attention and mask buffers) and workspaces of GEMM shapes not run
yet. A later step (a larger pass measured, a second pass size to fit a line through) can tighten the estimate and
promote more.

The seed YAML's numbers (V2-Lite, `max_gpu_memory: 24GB` = 24.0e9 bytes, 6 layers resident at load, a layer
1.107e9 bytes resident; measured peak 19.7e9 allocated at the run's largest pass), now measured at step 1:

    fragmentation  = max(measured, 3 % x 19.7e9 = 0.591e9)          -> 0.591e9 (expandable segments)
    margin         = 0.591e9 + max(1 GiB, 4 % x 24e9) = 0.591e9 + 1.074e9 = 1.665e9
    room           = 24.0e9 - 19.7e9 - 1.665e9 = 2.635e9             -> 2 layers (2.214e9), peak 21.9e9
    default allocator: fragmentation 1.97e9, margin 3.044e9, room 1.256e9 -> 1 layer

so 8 of 26 layers resident, 18 streamed (`tests/train/test_promotion.py`); a step then copies 2 x 18 - 2 = 34
layers per pass pair instead of 38.

Should a step still run out of GPU memory after a promotion, the trainer demotes every layer promoted here, reruns
the step from the state it began with, and promotes nothing more in that run (`KllamaTrainer.training_step`,
`ResidentPromotion.demote_all`). Training results do not change either way: a resident layer runs the same kernels on
the same weights as a streamed one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math
import os

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from kllama.config import parse_bytes
from kllama.model.engine_setup import demote_layer, promote_layers
from kllama.train.allocator import expandable_segments
from kllama.train.distributed import world_size
from kllama.train.micro_batching import worst_pass_tokens

GiB = 2**30
# A line through the measured passes is trusted to extrapolate only when their sizes span a quarter of the worst
# pass; closer points (noise in rows x length) fall back to the proportional estimate, which over-estimates.
MIN_FIT_SPREAD = 0.25
# Fragmentation kept free, as a share of the predicted allocation at the worst step's peak, however little the measured
# steps showed, by whether the allocator uses expandable segments: with the default one the seed-YAML OOM had 8.7 %
# of its allocation in holes, plus a request that fit in none; expandable segments unmap free pages between live
# blocks when the cap is reached, losing only partly used 20 MiB pages (docstring).
FRAGMENTATION_FLOOR: dict[bool, float] = {False: 0.10, True: 0.03}


def safety_margin(budget: int) -> int:
    """Bytes kept free beyond the worst-step estimate: 4 % of the budget, at least 1 GiB (about one V2-Lite
    layer's MoE backward buffers at 16k tokens, or a second logit chunk)."""
    return max(GiB, int(0.04 * budget))


@dataclass(frozen=True)
class StepMemory:
    """GPU memory of one optimizer step (bytes) and the padded tokens of its largest pass."""

    tokens: int
    start: int  # allocated when the step began
    peak_allocated: int
    peak_reserved: int
    end: int  # allocated after the optimizer step (gradients freed)
    peak_inactive_split: int = 0  # the allocator's largest free bytes inside split blocks during the step

    @property
    def fragmentation(self) -> int:
        """Reserved bytes the step could not use: reserved above allocated at the peaks, or the largest free bytes
        inside partly used blocks (`inactive_split_bytes`), whichever is larger."""
        return max(0, self.peak_reserved - self.peak_allocated, self.peak_inactive_split)

    @property
    def activations(self) -> int:
        """What the step allocated above its start at its peak: activations, gradients, transient buffers."""
        return max(0, self.peak_allocated - self.start)


def activation_bytes(steps: list[StepMemory], tokens: int) -> int:
    """Estimated `StepMemory.activations` of a step whose largest pass has `tokens` tokens, never below the truth
    for a linear `fixed + per_token x tokens`: measured directly when a step was that large; else the line through
    the measured (tokens, activations) points, raised to lie above all of them, when their sizes span
    `MIN_FIT_SPREAD` of `tokens`; else the largest step's activations scaled by `tokens` (which counts its fixed part
    as per-token too, so over-estimates)."""
    points = [(s.tokens, s.activations) for s in steps if s.tokens > 0]
    if not points:
        raise ValueError("no measured step with tokens")
    covering = [a for t, a in points if t >= tokens]
    if covering:
        return max(covering)
    xs = [t for t, _ in points]
    if max(xs) - min(xs) >= MIN_FIT_SPREAD * tokens:
        mean_t = sum(xs) / len(xs)
        mean_a = sum(a for _, a in points) / len(points)
        slope = max(0.0, sum((t - mean_t) * (a - mean_a) for t, a in points) / sum((t - mean_t) ** 2 for t in xs))
        fixed = max(a - slope * t for t, a in points)
        return int(fixed + slope * tokens)
    largest_t = max(xs)
    return int(max(a for t, a in points if t == largest_t) * tokens / largest_t)


def fragmentation_bytes(steps: list[StepMemory], allocated: int, activations: int, floor: float) -> int:
    """Reserved-but-unusable bytes to keep free beside a predicted peak allocation of `allocated` bytes, of which
    `activations` are the step's own: the fragmentation measured at the fullest step's peak (a smaller step after it
    still finds the larger one's blocks cached, which says nothing about fragmentation), grown in proportion when
    the activations are scaled beyond it, and at least `floor` (a `FRAGMENTATION_FLOOR`) of `allocated`."""
    fullest = max(reversed(steps), key=lambda s: s.peak_allocated)
    growth = max(1.0, activations / max(fullest.activations, 1))
    return max(int(fullest.fragmentation * growth), int(floor * allocated))


@dataclass(frozen=True)
class PromotionEstimate:
    """The worst step's predicted allocation and how many more layers fit beside it."""

    worst_bytes: int  # bytes the largest pass is predicted to allocate at its peak, before promotion
    layers: int  # layers to promote now
    margin: int  # bytes kept free beside it: fragmentation + safety margin
    fragmentation: int  # the fragmentation part of `margin`


def estimate_promotion(steps: list[StepMemory], *, worst_tokens: int, budget: int, layer_bytes: int,
                       candidates: int, expandable: bool = False) -> PromotionEstimate:
    """How many of `candidates` streamed layers of `layer_bytes` each to make resident under `budget` (the cap on
    reserved memory) after the measured `steps`, the allocator using expandable segments or not (see the module
    docstring for the estimate)."""
    activations = activation_bytes(steps, worst_tokens)
    worst = steps[-1].end + activations
    # the promoted layers' own blocks are allocated once, after an empty_cache, whole: they add no holes
    fragmentation = fragmentation_bytes(steps, worst, activations, FRAGMENTATION_FLOOR[expandable])
    margin = fragmentation + safety_margin(budget)
    fit = max(0, (budget - worst - margin) // layer_bytes) if layer_bytes > 0 else 0
    return PromotionEstimate(worst, int(min(candidates, fit)), margin, fragmentation)


class ResidentPromotion(TrainerCallback):
    """Measures each training step's GPU memory and makes more streamed expert layers resident when the measured
    worst case leaves room under `max_gpu_memory` (see the module docstring). The trainer reports each training
    pass's tokens through `observe_pass` (`planned_pass_tokens`); one line is printed per promotion. `demote_all` undoes every
    promotion and stops further ones (the trainer's answer to a step that ran out of GPU memory)."""

    def __init__(self, engine: Any, device: torch.device, budget: int, worst_tokens: int,
                 announce: bool = True, expandable: bool = False) -> None:
        self.engine, self.device, self.budget, self.worst_tokens = engine, device, budget, worst_tokens
        self.announce, self.expandable = announce, expandable
        self.steps: list[StepMemory] = []
        self.promoted: list[str] = []
        self.enabled = True
        self._before: dict[str, Any] = {}  # each promoted layer's placement before its promotion
        self._tokens = 0
        self._start = 0
        self._engine_start = 0
        self._run_peak = 0
        self._said_none = False

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def observe_pass(self, tokens: int) -> None:
        """A training pass of `tokens` tokens (`planned_pass_tokens`: the units of `worst_tokens`) ran in the
        current step."""
        self._tokens = max(self._tokens, tokens)

    def run_peak_allocated(self) -> int:
        """The largest GPU allocation of the run so far (torch's own peak is reset at every step here)."""
        return max(self._run_peak, torch.cuda.max_memory_allocated(self.device)) if self._cuda else 0

    def streamed(self) -> list[str]:
        """Names of the layers whose training passes stream their experts now."""
        return [name for name, m in self.engine.modules.items()
                if m.target_for(self.worst_tokens, training=True) == "stream"]

    def promote(self, count: int, why: str, candidates: list[str] | None = None) -> list[str]:
        """Make `count` more of `candidates` (default: the streamed layers) resident, spread over the stack;
        returns their names."""
        candidates = self.streamed() if candidates is None else candidates
        before = {name: self.engine.modules[name].placement for name in candidates}
        names = promote_layers(self.engine, count, spread=True, candidates=candidates, why=why)
        self._before.update({name: before[name] for name in names})
        self.promoted += names
        return names

    def demote_all(self) -> list[str]:
        """Stream every layer promoted here again (their GPU copies freed, the streamer's slots refilled from
        scratch, the allocator's cache emptied) and promote nothing more in this run; returns their names."""
        names, self.promoted, self.enabled = self.promoted, [], False
        if self._cuda:  # kernels the failed step queued may still read a stream slot or a resident copy
            torch.cuda.synchronize(self.device)
        for name in names:
            demote_layer(self.engine.modules[name], self._before.pop(name))
        if self.engine.streamer is not None:  # a slot a failed copy or compute left half-used is filled afresh
            self.engine.streamer.invalidate()
        if self._cuda:
            torch.cuda.empty_cache()
        return names

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._cuda:
            return
        if not self.steps:  # what loading and the crossover probes left cached is no part of a step's footprint
            torch.cuda.empty_cache()
        self._run_peak = self.run_peak_allocated()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start = torch.cuda.memory_allocated(self.device)
        self._engine_start = self.engine.gpu_bytes()
        self._tokens = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._cuda or self._tokens == 0:  # a step without a training pass (nothing to learn from)
            return
        # The engine's buffers a step allocated and kept (the stream slots and landing buffers, made at the run's
        # first streamed pass) are held between steps, like the weights: counted in the step's activations too, they
        # were counted twice. A run whose reference log-probs came from the cache (no pass before step 1) predicted
        # 2.8 GB too much on V2-Lite with fp8 experts and promoted nothing; a run that computed them promoted 3.
        kept = max(0, self.engine.gpu_bytes() - self._engine_start)
        self.steps.append(StepMemory(
            tokens=self._tokens, start=self._start + kept,
            peak_allocated=torch.cuda.max_memory_allocated(self.device),
            peak_reserved=torch.cuda.max_memory_reserved(self.device),
            end=torch.cuda.memory_allocated(self.device),
            peak_inactive_split=torch.cuda.memory_stats(self.device).get("inactive_split_bytes.all.peak", 0)))
        streamed = self.streamed()
        if not self.enabled or not streamed:
            return
        layer_bytes = max(self.engine.modules[name].dense_bytes() for name in streamed)  # resident: compute dtype
        estimate = estimate_promotion(self.steps, worst_tokens=self.worst_tokens, budget=self.budget,
                                      layer_bytes=layer_bytes, candidates=len(streamed), expandable=self.expandable)
        if estimate.layers == 0:
            # once, and only while none was promoted (after a promotion, a full budget is the expected state)
            if self.announce and not self._said_none and not self.promoted:
                self._said_none = True
                tqdm.write(no_promotion_line(state.global_step, estimate, layer_bytes, self.budget,
                                             self.worst_tokens, len(streamed), len(self.engine.modules)))
            return
        torch.cuda.empty_cache()  # the new resident blocks get fresh segments, not holes between cached activations
        names = self.promote(estimate.layers, f"resident after step {state.global_step}'s measured peak")
        if self.announce:
            # tqdm.write: the line gets its own line above the step bar instead of following the bar on it
            tqdm.write(promotion_line(len(names), state.global_step, estimate, layer_bytes, self.budget,
                                      self.worst_tokens, len(self.streamed()), len(self.engine.modules)))


def promotion_line(count: int, step: int, estimate: PromotionEstimate, layer_bytes: int, budget: int,
                   worst_tokens: int, streamed: int, layers: int) -> str:
    """The line printed when layers are promoted."""
    peak = estimate.worst_bytes + count * layer_bytes
    return (f"promoted {count} more layer{'s' if count != 1 else ''} after step {step}: peak {peak / 1e9:.1f} GB "
            f"allocated of {budget / 1e9:.1f} GB budget (predicted for a {worst_tokens:,}-token pass from the "
            f"measured steps, +{estimate.margin / 1e9:.1f} GB kept free for fragmentation "
            f"({estimate.fragmentation / 1e9:.1f} GB) and safety); {streamed} of {layers} MoE layers stream")


def no_promotion_line(step: int, estimate: PromotionEstimate, layer_bytes: int, budget: int, worst_tokens: int,
                      streamed: int, layers: int) -> str:
    """The line printed (once a run) when a measured step leaves no room for another resident layer."""
    room = max(0, budget - estimate.worst_bytes - estimate.margin)
    return (f"no layer promoted after step {step}: a {worst_tokens:,}-token pass is predicted to allocate "
            f"{estimate.worst_bytes / 1e9:.1f} GB, +{estimate.margin / 1e9:.1f} GB kept free for fragmentation "
            f"({estimate.fragmentation / 1e9:.1f} GB) and safety, leaving {room / 1e9:.1f} GB of the "
            f"{budget / 1e9:.1f} GB budget; a resident layer needs {layer_bytes / 1e9:.1f} GB; {streamed} of "
            f"{layers} MoE layers stream")


def build_promotion(config: Any, engine: Any, device: torch.device, train_rows: Any, plan: Any,
                    announce: bool, shared: bool = False) -> ResidentPromotion | None:
    """The run's `ResidentPromotion`, or None where it has nothing to do: no expert engine, no CUDA device, no
    `max_gpu_memory`, or no layer streaming its training passes."""
    if engine is None or device.type != "cuda" or not config.engine.max_gpu_memory or train_rows is None:
        return None
    t = config.training
    epochs = None if plan is None else run_epochs(len(train_rows), plan.step_rows * world_size(), t.max_steps,
                                                  t.num_train_epochs)
    worst = worst_pass_tokens(train_rows, config.finetuning.stage, plan, t.per_device_train_batch_size, epochs,
                              shared)
    budget = min(parse_bytes(config.engine.max_gpu_memory), torch.cuda.get_device_properties(device).total_memory)
    promotion = ResidentPromotion(engine, device, budget, worst, announce=announce,
                                  expandable=allocator_expandable())
    return promotion if promotion.streamed() else None


def run_epochs(rows: int, rows_per_step: int, max_steps: int, num_train_epochs: float) -> int:
    """Epochs (whole or started) a run of `rows` training rows, `rows_per_step` a step, goes through: as the Trainer
    counts them, `max_steps` (when > 0) over the steps of an epoch (the last one partial), else `num_train_epochs`
    rounded up."""
    steps_per_epoch = max(1, math.ceil(rows / max(rows_per_step, 1)))
    if max_steps > 0:
        return max(1, math.ceil(max_steps / steps_per_epoch))
    return max(1, math.ceil(num_train_epochs))


def allocator_expandable() -> bool:
    """Whether this process's CUDA caching allocator uses expandable segments: the settings torch parsed where it
    tells them (`torch._C._accelerator_getAllocatorSettings`; an environment set after CUDA started does not
    count), else the environment."""
    settings = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if settings is not None:
        return expandable_segments({"PYTORCH_ALLOC_CONF": settings()})
    return expandable_segments(os.environ)
