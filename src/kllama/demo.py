"""`make demo`: a tiny DeepSeek-V2-shaped MoE model, DPO-trained on the bundled preference set through the expert
engine on the CPU, evaluated on held-out pairs before and after, then asked one question.

Everything is real: a Hugging Face model directory is written, `kllama train` runs from a config, the adapter is
re-loaded with stock transformers + PEFT for the evaluation.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch

DEMO_SETTINGS: dict[str, object] = {
    "stage": "dpo",
    "finetuning_type": "lora",
    "lora_rank": 16,
    "lora_target": "all",
    "pref_beta": 0.1,
    "pref_loss": "sigmoid",
    "dataset": "dpo_en_demo",
    "template": "deepseek",
    "cutoff_len": 256,
    "val_size": 0.15,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3.0e-3,
    "num_train_epochs": 3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "logging_steps": 5,
    "eval_steps": 25,
    "pref_ftx": 1.0,
    "save_steps": 1000,
    "plot_loss": True,
    "overwrite_output_dir": True,
    "report_to": "none",
    "seed": 42,
    "use_kt": True,
    "expert_placement": "cpu",
    "cpu_infer": 2,
    "do_sample": False,
    "max_new_tokens": 48,
}


def held_out_scores(model_dir: Path, adapter_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Re-load base + adapter with stock transformers + PEFT and score held-out pairs: how often the model ranks the
    chosen answer above the rejected one (mean log-prob per token), before and after training, and the DPO reward
    accuracy (policy-vs-reference log-ratio of chosen above that of rejected; ties count one half)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kllama.compat import peft_wrapped
    from kllama.data import PairwiseCollator
    from kllama.train.trainer import PreferenceSettings, policy_logps

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft_wrapped(partial(PeftModel.from_pretrained, base, adapter_dir)).eval()
    collate = PairwiseCollator(0, pad_to_multiple_of=8)
    sums = {"before": [], "after": []}
    counts = []
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = collate(rows[start:start + 16])
            with model.disable_adapter():
                s, n, _ = policy_logps(model, batch, PreferenceSettings())
            sums["before"].append(s)
            counts.append(n)
            s, _, _ = policy_logps(model, batch, PreferenceSettings())
            sums["after"].append(s)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = t.shape[0] // 2
        return t[:half], t[half:]

    ranking, margins = {}, {}
    for when in ("before", "after"):
        chosen_all, rejected_all, avg_c, avg_r = [], [], [], []
        for s, n in zip(sums[when], counts):
            (c, r), (nc, nr) = split(s), split(n.float())
            chosen_all.append(c)
            rejected_all.append(r)
            avg_c.append(c / nc)
            avg_r.append(r / nr)
        ranking[when] = (torch.cat(avg_c) > torch.cat(avg_r)).float().mean().item()
        margins[when] = torch.cat(chosen_all) - torch.cat(rejected_all)  # log pi(c) - log pi(r) per pair
    reference = margins["before"]  # the reference model is the base model, i.e. the policy before training

    def reward_accuracy(policy_margin: torch.Tensor) -> float:
        reward_margin = policy_margin - reference  # (pi_c - ref_c) - (pi_r - ref_r)
        return ((reward_margin > 0).float() + 0.5 * (reward_margin == 0).float()).mean().item()

    return {"ranking_before": ranking["before"], "ranking_after": ranking["after"],
            "reward_accuracy_before": reward_accuracy(margins["before"]),
            "reward_accuracy_after": reward_accuracy(margins["after"])}


def main(argv: list[str] | None = None) -> int:
    """Run the demo in `--workdir` (default `.demo`)."""
    from kllama.config import build_config
    from kllama.data import build_dataset, get_template
    from kllama.model.tiny import write_tiny_model
    from kllama.train.run import run_training

    parser = argparse.ArgumentParser(prog="python -m kllama.demo", description=__doc__)
    parser.add_argument("--workdir", default=".demo", help="where the model, adapter and plots are written")
    parser.add_argument("--epochs", type=float, default=None, help="override num_train_epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    work = Path(args.workdir)
    model_dir, out_dir = work / "tiny-deepseek-v2", work / "saves" / "dpo"
    started = time.perf_counter()
    print(f"[demo] writing a tiny DeepSeek-V2-shaped MoE model to {model_dir}", flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    write_tiny_model(model_dir, "deepseek_v2", seed=0)

    settings = dict(DEMO_SETTINGS, model_name_or_path=str(model_dir), output_dir=str(out_dir),
                    cache_dir=str(work / "cache"))
    if args.epochs is not None:
        settings["num_train_epochs"] = args.epochs
    config = build_config(settings, command="train")
    print("[demo] DPO training with the expert engine (routed experts in host RAM, computed on the CPU)", flush=True)
    run_training(config)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = get_template(config.data.template, tokenizer)
    bundle = build_dataset(config.data, tokenizer, template, stage="dpo", seed=config.training.seed,
                           cache_dir=config.model.cache_dir)
    rows = [bundle.eval[i] for i in range(len(bundle.eval))]
    scores = held_out_scores(model_dir, out_dir, rows)
    print(f"\n[demo] held-out pairs: {len(rows)}")
    print(f"[demo] held-out reward accuracy : before {scores['reward_accuracy_before']:.2f} (policy = reference)  "
          f"after {scores['reward_accuracy_after']:.2f}")
    print(f"[demo] ranks chosen above rejected (mean log-prob/token): before {scores['ranking_before']:.2f}  "
          f"after {scores['ranking_after']:.2f}")
    print(f"[demo] plots: {', '.join(str(p) for p in sorted(out_dir.glob('training_*.png')))}")

    chat_config = build_config(dict(settings, adapter_name_or_path=str(out_dir), infer_backend="ktransformers"),
                               command="chat")
    question = "How do I keep my houseplants healthy?"
    print("\n[demo] chat with the adapter (expert engine, greedy)", flush=True)
    from kllama.infer.engine import build_engine, sampling_defaults

    engine = build_engine(chat_config)
    print(f"User: {question}\nAssistant: ", end="", flush=True)
    prompt = engine.encode([{"role": "user", "content": question}])
    for chunk in engine.stream(prompt, sampling_defaults(chat_config)):
        print(chunk.text, end="", flush=True)
    print(f"\n\n[demo] done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
