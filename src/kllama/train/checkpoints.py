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


def prepare_output_dir(output_dir: str | Path, *, overwrite: bool, resuming: bool) -> None:
    """Create `output_dir`, drop half-written staging leftovers, and with `overwrite` (and no resume) remove old
    checkpoints so a new run never mixes with an old one."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging_dir(out), ignore_errors=True)
    if overwrite and not resuming:
        for child in out.iterdir():
            if _CHECKPOINT.match(child.name) and child.is_dir():
                shutil.rmtree(child)


class PublishCheckpoints(TrainerCallback):
    """Move each finished staged checkpoint into `output_dir` atomically and keep at most `save_total_limit`."""

    def __init__(self, output_dir: str | Path, save_total_limit: int | None):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
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
