"""`kllama` command line: train | chat | api | export | tiny | env.

Each config-driven command loads and validates its YAML (plus `key=value` overrides) here, then hands the typed
config to the job's module, imported lazily so `kllama --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from kllama import __version__
from kllama.errors import KllamaError

# command -> (help, "module:function" that runs the job with a KllamaConfig)
CONFIG_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("Train a LoRA adapter (stage sft or dpo) from a LLaMA-Factory-style YAML.", "kllama.train.run:run_training"),
    "chat": ("Chat with the base model + adapter in the terminal (reads stdin when piped).", "kllama.infer.chat:run_chat"),
    "api": ("Serve an OpenAI-compatible API (API_HOST, API_PORT, API_KEY from the environment).", "kllama.infer.api:run_api"),
    "export": ("Merge the adapter into the base weights and write a standard checkpoint.", "kllama.infer.export:run_export"),
}

_EPILOG = """\
Settings use LLaMA-Factory's key names. Any key can be set or overridden after the config file:
  kllama train cfg.yaml learning_rate=1e-5 max_steps=3
Values are typed by the key (5.0e-6, null, true, comma lists a,b)."""


def _resolve(target: str) -> Callable[..., object]:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kllama",
        description="Preference-tune (DPO family) and serve Mixture-of-Experts LLMs that do not fit on one GPU.",
    )
    parser.add_argument("--version", action="version", version=f"kllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help="YAML or JSON config file (optional when every key is given as key=value)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")
        p.add_argument("--print-config", action="store_true", help="print the fully resolved config (defaults shown) and exit")
    tiny = sub.add_parser("tiny", help="Write a tiny random Hugging Face model directory (for tests and demos).",
                          description="Write a tiny random model (real transformers config, shrunk) with a local tokenizer.")
    tiny.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    tiny.add_argument("--arch", default="deepseek_v2", help="model family (deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, "
                      "mixtral, olmoe, llama, qwen3)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical weights")
    sub.add_parser("env", help="Print versions, CPU features (AVX2/AVX512/AMX), cores, RAM and GPUs for bug reports.",
                   description="Print versions, CPU features, cores, RAM and GPUs for bug reports.")
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `kllama train key=value ...` without a file: argparse puts the first override into `config`.
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml", ".json")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def _run_config_command(args: argparse.Namespace) -> int:
    # before anything can initialise CUDA (torchrun's workers inherit it)
    allocator_line = _choose_training_allocator() if args.command == "train" else None
    from kllama.config import format_config, load_config

    config_path, overrides = _split_config_and_overrides(args)
    config = load_config(config_path, overrides, command=args.command)
    if args.print_config:
        print(format_config(config))
        return 0
    if allocator_line:
        print(allocator_line, flush=True)
    if args.command == "train":  # FORCE_TORCHRUN=1 or several GPUs: data-parallel under torchrun, as LLaMA-Factory
        from kllama.train.launch import launch, torchrun_command

        if (command := torchrun_command(["train", *([args.config] if args.config else []), *args.overrides])):
            return launch(command)
    job = _resolve(CONFIG_COMMANDS[args.command][1])
    result = job(config)
    return int(result) if isinstance(result, int) else 0


def _choose_training_allocator() -> str | None:
    """Expandable segments for `kllama train` unless the user set an allocator configuration
    (`kllama.train.allocator`); returns the line saying so in the process the user started, None in torchrun's
    workers (the launcher said it)."""
    import os

    from kllama.train.allocator import use_training_allocator
    from kllama.train.launch import in_torchrun_worker

    line = use_training_allocator(os.environ)
    return None if in_torchrun_worker(os.environ) else line


def _run_tiny(args: argparse.Namespace) -> int:
    from kllama.model.tiny import write_tiny_model

    path = write_tiny_model(args.out_dir, args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} model (seed {args.seed}) to {path}")
    return 0


def _run_env(args: argparse.Namespace) -> int:
    from kllama.envinfo import collect_env, format_env

    print(format_env(collect_env()))
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    **{name: _run_config_command for name in CONFIG_COMMANDS},
    "tiny": _run_tiny,
    "env": _run_env,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kllama` console script; returns the exit status."""
    parser = build_parser()
    # Options may sit anywhere on the line (`kllama train cfg.yaml --print-config max_steps=3`): argparse stops
    # filling `overrides` at the first option, so key=value words it left over are overrides too.
    args, leftover = parser.parse_known_args(argv)
    stray = [word for word in leftover if args.command not in CONFIG_COMMANDS or "=" not in word or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if leftover:
        args.overrides = [*args.overrides, *leftover]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _HANDLERS[args.command](args)
    except KllamaError as exc:
        print(f"kllama {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kllama {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
