"""A training run's folder on disk: checkpoints that are complete or absent, and the run's
configuration, checked on `--resume`.

Checkpoints. The Trainer writes `checkpoint-N` file by file, so a kill or a full disk in the
middle of a save used to leave a folder that `--resume` took for the newest checkpoint. Here a
checkpoint is written into a staging folder (`.checkpoint-staging/checkpoint-N`), every file is
flushed to disk, a marker listing every file and its size is written last, and only then is the
folder renamed to `OUT/checkpoint-N`, in one step. A checkpoint is *complete* when its marker is
there and every file it lists has the listed size; anything else (a folder from an older qtune,
one damaged by hand, one whose deletion was cut short) is incomplete: `--resume` names it,
deletes it and resumes from the newest complete one. Rotation (`save_total_limit`) counts only
complete checkpoints, so it never deletes the last complete one in favour of an incomplete one.

Configuration. `OUT/run_config.json` records the options of the run. `--resume` compares the
new options with it: options that cannot change what the run trains are never compared
(`NOT_COMPARED`); options in `CHANGEABLE` may differ when `--allow-config-change` lists them;
any other difference refuses the resume, even when listed.

`StagedCheckpoints` is the mixin by which a `transformers.Trainer` (qtune's, TRL's) writes its
checkpoints this way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import QTuneError
from .io import disk_full_message, write_json
from .run_log import truncate_step_log

#: Written last into a checkpoint: its step and the size of every other file in it.
MARKER = "qtune-checkpoint.json"
#: Where a checkpoint is written before it is moved into place; a leftover is removed unread.
STAGING = ".checkpoint-staging"
RUN_CONFIG = "run_config.json"

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

#: Options that cannot change what the run trains: never compared on --resume.
NOT_COMPARED = frozenset({
    "out", "resume", "allow_config_change", "progress", "logging_steps", "report_to", "save_steps",
    "save_total_limit", "num_proc", "data_cache",
})

#: Options that may differ on --resume when --allow-config-change lists them. Each changes only
#: what comes next: the length of the run (epochs, max_steps: the schedule is stretched or shrunk
#: from the current step on), the arithmetic of the next steps (dtype: the weights stay float32;
#: device; max_grad_norm), what a later non-finite step does (nonfinite), the memory of the
#: scoring pass and the loss (chunk_tokens, head_impl, kept_row_layout) or how the final model is saved (merge_lora). Any other option is
#: refused: other data, model, tokenization, seed, batch shape or pruning method would make one
#: run out of two different ones, and a new --lr, --lr-scheduler, --warmup-ratio or
#: --weight-decay would be silently replaced by the optimizer and scheduler states that the
#: checkpoint restores.
CHANGEABLE = frozenset({"epochs", "max_steps", "dtype", "device", "max_grad_norm", "nonfinite", "chunk_tokens",
                        "head_impl", "kept_row_layout", "merge_lora"})


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_step(folder: Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(_CHECKPOINT.fullmatch(folder.name).group(1))


def _file_sizes(folder: Path) -> dict[str, int]:
    """Size of every file under `folder` (paths relative to it), the marker left out."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def is_complete(folder: Path) -> bool:
    """True when `folder` carries a marker for its own step and every file the marker lists is
    there with the listed size."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return marker["step"] == checkpoint_step(folder) and all(
            (folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def scan(out: Path) -> tuple[list[Path], list[Path]]:
    """The complete and the incomplete `checkpoint-N` folders of `out`, each sorted by step."""
    if not out.is_dir():
        return [], []
    folders = sorted((p for p in out.iterdir() if _CHECKPOINT.fullmatch(p.name) and p.is_dir()),
                     key=checkpoint_step)
    complete = [p for p in folders if is_complete(p)]
    return complete, [p for p in folders if p not in complete]


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint, marker first: a kill midway leaves a folder that reads as incomplete."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder)


def rotate(out: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints until `keep` are left (None or < 1: keep all)."""
    if keep is None or keep < 1:
        return
    complete, _ = scan(out)
    for folder in complete[:-keep]:
        remove_checkpoint(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """Flush every file of `folder` to disk, then write its marker and flush that too: the marker
    is on disk only after everything it vouches for."""
    sizes = _file_sizes(folder)
    for name in sizes:
        _fsync(folder / name)
    marker = folder / MARKER
    marker.write_text(json.dumps({"step": checkpoint_step(folder), "files": sizes}, indent=1), encoding="utf-8")
    _fsync(marker)
    _fsync(folder)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it arose from, reports a full disk (or quota): an OSError
    with ENOSPC or EDQUOT, safetensors' "No space left on device (os error 28)", or torch's
    "unexpected pos", which is how torch.save reports a short write (it gives no errno)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def discard_on_failure(partial: Path, target: Path) -> Iterator[None]:
    """Around the writing of `partial` (a folder that becomes `target`): on any error remove what
    was written, and report a full disk as a one-line QTuneError naming `target`."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise QTuneError(disk_full_message(target)) from None
        raise


def discard_staging(out: Path) -> None:
    """Remove the staging folder: empty after a save, a partial checkpoint after a killed one."""
    shutil.rmtree(out / STAGING, ignore_errors=True)


@contextlib.contextmanager
def staged_checkpoint(out: Path, step: int) -> Iterator[Path]:
    """Yield the folder under which the caller writes `checkpoint-<step>/`; when the block ends
    without error, seal the checkpoint and move it to `out/checkpoint-<step>` in one rename.

    An error (a full disk included) removes the staging folder and leaves `out` as it was; a kill
    leaves only the staging folder, which no reader takes for a checkpoint."""
    staging = out / STAGING
    discard_staging(out)
    staging.mkdir()
    name = f"checkpoint-{step}"
    target = out / name
    with discard_on_failure(staging, target):
        yield staging
        _seal(staging / name)
        if target.exists():  # an incomplete leftover of the same step
            remove_checkpoint(target)
        os.replace(staging / name, target)
        _fsync(out)
    discard_staging(out)


# --- run configuration ---------------------------------------------------------------------------


def allowed_changes(text: str | None) -> set[str]:
    """The option names of --allow-config-change ("epochs,max_steps"; dashes or underscores).
    Names outside `CHANGEABLE` are refused, so that listing an unsafe option never allows it."""
    names = {n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip()}
    unsafe = sorted(names - CHANGEABLE)
    if unsafe:
        raise QTuneError(f"--allow-config-change: {', '.join(unsafe)} cannot change on resume; options that "
                         f"can: {', '.join(sorted(CHANGEABLE))}")
    return names


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{option: (old, new)} for the compared options whose values differ. Options that `old`
    does not record (added by a later qtune) are not compared."""
    return {k: (old[k], new[k]) for k in sorted(new)
            if k in old and k not in NOT_COMPARED and old[k] != new[k]}


def save_run_config(out: Path, config: dict) -> None:
    write_json(out / RUN_CONFIG, config)


def check_run_config(out: Path, config: dict, allowed: set[str]) -> None:
    """Refuse to resume when the options differ from the run's recorded ones, naming every
    difference (old -> new), unless each differing option is changeable and allowed."""
    path = out / RUN_CONFIG
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QTuneError(f"--resume: {path} is missing, so the options of the run are unknown; "
                         "start a new run in another --out") from None
    changes = config_changes(old, config)
    refused = [k for k in changes if k not in allowed]
    if not refused:
        return
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    unsafe = [k for k in refused if k not in CHANGEABLE]
    advice = []
    if unsafe:
        advice.append(f"{', '.join(unsafe)} cannot change on resume (start a new run in another --out)")
    if len(unsafe) < len(refused):
        names = ",".join(k for k in refused if k in CHANGEABLE)
        advice.append(f"to accept {names.replace(',', ', ')}, pass --allow-config-change {names}")
    raise QTuneError(f"--resume: the options differ from those in {path}: {listed}; {'; '.join(advice)}")


class StagedCheckpoints:
    """Mixin for a `transformers.Trainer` (or a TRL trainer built on it), before it in the bases:
    checkpoints staged so that `checkpoint-N` appears complete or not at all, then the oldest
    complete ones beyond `self.keep_checkpoints` deleted (`qtune.checkpoints`). The main process
    stages, seals and rotates; every process writes its own files (the Trainer's per-process RNG
    states) between two barriers. A subclass adds files through `_checkpoint_extra`. Its `train`
    resolves `resume_from_checkpoint` with `_checkpoint_to_resume` and restarts its step log
    (`self.step_log`, the subclass's) with `_restart_step_log`."""

    keep_checkpoints: int | None = None
    _staging: Path | None = None  # the staging folder while _save_checkpoint runs

    def _checkpoint_extra(self) -> Callable[[Path], None] | None:
        """Called by every process before a checkpoint is staged (it may gather); returns what the
        main process then writes into the checkpoint's folder, or None."""
        return None

    def _save_checkpoint(self, model, trial):
        out = Path(self.args.output_dir)
        main = self.args.should_save
        extra = self._checkpoint_extra()
        staged = (staged_checkpoint(out, self.state.global_step) if main
                  else contextlib.nullcontext(out / STAGING))
        with staged as staging:
            self.accelerator.wait_for_everyone()  # the staging folder exists before anyone writes
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)
                if main and extra is not None:
                    extra(staging / f"checkpoint-{self.state.global_step}")
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every file is written before the main process seals
        if main:
            rotate(out, self.keep_checkpoints)

    def _get_output_dir(self, trial):
        # The Trainer saves a checkpoint under this folder: the staging one while _save_checkpoint runs.
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def _checkpoint_to_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """`train`'s argument with `True` made the newest complete checkpoint of `output_dir`."""
        if resume_from_checkpoint is True:
            complete, _ = scan(Path(self.args.output_dir))
            if not complete:
                raise QTuneError(f"no complete checkpoint in {self.args.output_dir} to resume from")
            return str(complete[-1])
        return resume_from_checkpoint or None

    def _restart_step_log(self, resumed_from: str | None) -> None:
        """Main process: cut the step log back to the checkpoint's step (those steps are about to be
        trained again), or start a new one for a fresh run."""
        if self.is_world_process_zero():
            if resumed_from:
                truncate_step_log(self.step_log, checkpoint_step(Path(resumed_from)))
            else:
                self.step_log.unlink(missing_ok=True)
