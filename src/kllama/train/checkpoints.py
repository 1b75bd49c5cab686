"""Checkpoints that are either complete or invisible.

transformers' Trainer writes `checkpoint-N` in place, so a kill during a save leaves a half-written directory that
"resume from the latest" would pick. kllama points the Trainer at a staging directory (`<output_dir>/.staging`) and a
callback moves each finished checkpoint into `output_dir` with one rename, then applies `save_total_limit`.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kllama.errors import KllamaError
from kllama.train.distributed import barrier

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last


def staging_dir(output_dir: str | Path) -> Path:
    """Where the Trainer writes checkpoints before they are published."""
    return Path(output_dir) / STAGING


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Published, complete checkpoints of `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: bool | str | None, output_dir: str | Path) -> Path | None:
    """`resume_from_checkpoint`: None/False = fresh start; True/"latest" = newest complete checkpoint; else a path."""
    if resume in (None, False):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "latest"):
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise KllamaError(f"resume_from_checkpoint: true, but {str(output_dir)!r} has no complete checkpoint; "
                              "remove the key to start fresh")
        return checkpoints[-1]
    path = Path(str(resume))
    if not (path / COMPLETE_MARKER).is_file():
        raise KllamaError(f"resume_from_checkpoint: {str(path)!r} is not a complete checkpoint (no {COMPLETE_MARKER})")
    return path


# Files a finished run leaves at the top of output_dir (besides the tokenizer's, which the next run rewrites).
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "all_results.json",
             "training_args.yaml", "template.json")
RUN_FILE_PATTERNS = ("training_*.png",)


def check_output_dir_writable(output_dir: str | Path) -> None:
    """Create `output_dir` if needed and prove a file can be written there; removes nothing."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kllama-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise KllamaError(f"output_dir: cannot write into {str(out)!r} ({exc.strerror or exc}); choose a directory "
                          "you can write to") from None


def old_run_entries(output_dir: str | Path) -> list[Path]:
    """The previous run's checkpoints and result files in `output_dir` (what `overwrite_output_dir` replaces)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    entries = [child for child in out.iterdir() if _CHECKPOINT.match(child.name) and child.is_dir()]
    entries += [out / name for name in RUN_FILES if (out / name).is_file()]
    entries += [path for pattern in RUN_FILE_PATTERNS for path in out.glob(pattern)]
    return sorted(entries)


def prepare_output_dir(output_dir: str | Path, *, overwrite: bool, resuming: bool) -> None:
    """Make `output_dir` ready for the run that is about to start: drop half-written staging leftovers and, with
    `overwrite` (and no resume), the previous run's checkpoints and results, so a new run never mixes with an old
    one. Call it only once everything is validated and loaded: from here on the old run is gone."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging_dir(out), ignore_errors=True)
    if overwrite and not resuming:
        for entry in old_run_entries(out):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


class PublishCheckpoints(TrainerCallback):
    """Move each finished staged checkpoint into `output_dir` atomically and keep at most `save_total_limit`.

    In a data-parallel run every rank writes its RNG state into the staged checkpoint, so all ranks meet here first
    and rank 0 alone publishes it.
    """

    def __init__(self, output_dir: str | Path, save_total_limit: int | None):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        barrier()
        if not state.is_world_process_zero:
            return
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (staged / COMPLETE_MARKER).is_file():
            return
        target = self.output_dir / staged.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # one rename: the checkpoint appears whole or not at all
        if self.save_total_limit:
            for old in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)


def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."), safetensors as SafetensorError
    return (OSError, RuntimeError, SafetensorError)


WRITE_ERRORS = _write_errors()


class SaveTracker(TrainerCallback):
    """Knows which checkpoint is being written: set by the trainer's `save_model` (the Trainer's first step of a
    checkpoint save), cleared by `on_save` (its last). An error escaping the Trainer while `current` is set is a
    failed save, not a failed training step."""

    def __init__(self) -> None:
        self.current: Path | None = None

    def begin(self, path: str | Path) -> None:
        """A save into `path` starts."""
        self.current = Path(path)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        self.current = None


def save_failed(path: Path, exc: BaseException, output_dir: str | Path) -> KllamaError:
    """The error for a checkpoint or result that could not be written (disk full, quota, file-size limit): the
    half-written directory is removed (it was never published) and the message names the newest intact checkpoint."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if path.parent.name == STAGING:
        shutil.rmtree(path, ignore_errors=True)
    checkpoints = list_checkpoints(output_dir)
    kept = (f"the earlier checkpoints are intact (newest: {checkpoints[-1]}; resume_from_checkpoint: true continues "
            "from it)" if checkpoints else "no checkpoint was published")
    return KllamaError(f"could not write {str(path)!r} ({text}): the disk is probably full, or a quota or file-size "
                       f"limit was hit; free space there and run again; {kept}")
