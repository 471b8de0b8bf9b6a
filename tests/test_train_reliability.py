"""Training runs survive faults: kills during a checkpoint save, a full disk, a second process on
the same folder, a diverging loss, a resume with other options, a resume from the last step."""

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SRC, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from transformers.trainer_utils import get_last_checkpoint

from qtune import checkpoints
from qtune.config import TrainConfig
from qtune.errors import QTuneError
from qtune.io import LOCK_FILE, disk_full_message
from qtune.train import read_step_log, run_train


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def assert_finite(folder):
    assert all(bool(t.isfinite().all()) for t in weights(folder).values())


def steps_of(out):
    return [r["step"] for r in read_step_log(out / "steps.jsonl")]


# --- kills and a full disk during a checkpoint save ---------------------------------------------

# A training process that SIGKILLs itself at `point` (argv[1]) of the save of checkpoint-(max_steps - 2),
# or of the deletion of checkpoint-(max_steps - 4) that rotation does right after it.
KILLER = """
import json, os, shutil, signal, sys
from pathlib import Path
import torch
import qtune.checkpoints as ckpt
from qtune.config import TrainConfig
from qtune.train import run_train

point, config = sys.argv[1], json.loads(sys.argv[2])
target = f"checkpoint-{config['max_steps'] - 2}"


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def unless(test, original):
    return lambda *args, **kwargs: die() if test(*args) else original(*args, **kwargs)


if point == "writing the optimizer state":
    torch.save = unless(lambda obj, f: str(f).endswith(target + "/optimizer.pt"), torch.save)
elif point == "before the marker":
    ckpt._seal = unless(lambda folder: folder.name == target, ckpt._seal)
elif point == "before the rotation":
    ckpt.rotate = unless(lambda out, keep: (out / target).exists(), ckpt.rotate)
elif point == "deleting an old checkpoint":
    oldest = f"checkpoint-{config['max_steps'] - 4}"
    shutil.rmtree = unless(lambda path: Path(path).name == oldest, shutil.rmtree)
run_train(TrainConfig(**config))
"""


@pytest.fixture(scope="module")
def straight_run(tiny_run_inputs, tmp_path_factory):
    """An uninterrupted 6-step run, the reference for resumed ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(train_config(tiny_run_inputs, out, method="random", max_steps=6))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point, complete, incomplete", [
    pytest.param("writing the optimizer state", [2, 3], [], id="writing the optimizer state"),
    pytest.param("before the marker", [2, 3], [], id="before the marker"),
    pytest.param("before the rotation", [2, 3, 4], [], id="before the rotation"),
    pytest.param("deleting an old checkpoint", [3, 4], [2], id="deleting an old checkpoint"),
])
def test_kill_during_a_checkpoint_save_then_resume_matches_an_uninterrupted_run(
        tiny_run_inputs, straight_run, tmp_path, capsys, point, complete, incomplete):
    """SIGKILL at a point of the save of checkpoint-4 (or of the deletion of checkpoint-2 that
    follows it): no folder looks like a newer checkpoint than the newest complete one, and
    --resume continues from that one to the weights of an uninterrupted run."""
    out = tmp_path / "run"
    cfg = train_config(tiny_run_inputs, out, method="random", max_steps=6, save_steps=1, save_total_limit=2)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    victim = subprocess.run([sys.executable, "-c", KILLER, point, json.dumps(dataclasses.asdict(cfg))], env=env,
                            capture_output=True, timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.decode()[-2000:]

    found = checkpoints.scan(out)
    assert [[checkpoints.checkpoint_step(p) for p in group] for group in found] == [complete, incomplete]
    assert get_last_checkpoint(str(out)) == str(out / f"checkpoint-{complete[-1]}")  # even transformers' pick

    capsys.readouterr()
    run_train(train_config(tiny_run_inputs, out, method="random", max_steps=6, save_steps=1, save_total_limit=2,
                           resume=True))
    notice = [line for line in capsys.readouterr().err.splitlines() if "incomplete" in line]
    assert notice == ([f"--resume: skipping incomplete checkpoint(s) checkpoint-2 (cut short by a crash or a full "
                       f"disk; deleted), resuming from checkpoint-{complete[-1]}"] if incomplete else [])
    assert steps_of(out) == list(range(1, 7))
    assert_same_weights(out / "model", straight_run / "model")
    assert [p.name for p in checkpoints.scan(out)[0]] == ["checkpoint-5", "checkpoint-6"]
    assert not (out / checkpoints.STAGING).exists()


def test_resume_skips_damaged_and_legacy_checkpoints(tiny_run_inputs, straight_run, tmp_path, capsys):
    """A checkpoint missing a file, or one without the completion marker (written by an older
    qtune, or a folder cut short), is named, deleted and skipped."""
    out = tmp_path / "run"
    options = dict(method="random", max_steps=6, save_steps=1, save_total_limit=4)
    run_train(train_config(tiny_run_inputs, out, **options))
    for path in list((out / "checkpoint-6").iterdir()):
        if path.name != "config.json":  # a folder whose save died just after it started
            path.unlink()
    (out / "checkpoint-5" / "trainer_state.json").unlink()
    (out / "checkpoint-4" / checkpoints.MARKER).unlink()
    capsys.readouterr()
    run_train(train_config(tiny_run_inputs, out, resume=True, **options))
    assert ("--resume: skipping incomplete checkpoint(s) checkpoint-4, checkpoint-5, checkpoint-6 (cut short by a "
            "crash or a full disk; deleted), resuming from checkpoint-3") in capsys.readouterr().err
    assert steps_of(out) == list(range(1, 7))
    assert_same_weights(out / "model", straight_run / "model")
    assert all(checkpoints.is_complete(p) for p in out.glob("checkpoint-*"))


def test_resume_without_a_complete_checkpoint_is_refused_and_deletes_nothing(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    run_train(train_config(tiny_run_inputs, out, max_steps=1, save_steps=1))
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"cut")
    with pytest.raises(QTuneError, match=r"--resume: no checkpoint in .* to resume from \(only incomplete ones: "
                                         r"checkpoint-1\)"):
        run_train(train_config(tiny_run_inputs, out, max_steps=1, save_steps=1, resume=True))
    assert (out / "checkpoint-1").is_dir()


TORCH_DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 82240 vs 82128")


@pytest.mark.parametrize("error", [TORCH_DISK_FULL, OSError(errno.ENOSPC, "No space left on device")],
                         ids=["torch.save", "OSError"])
def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tiny_run_inputs, tmp_path,
                                                                            monkeypatch, error):
    """The device fills up while checkpoint-3 is written: one-line error naming the disk, the
    partial save is removed, checkpoint-2 stays complete, and --resume finishes the run."""
    out = tmp_path / "run"
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-3/optimizer.pt"):
            raise error
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    options = dict(max_steps=4, save_steps=1, save_total_limit=1)
    with pytest.raises(QTuneError) as caught:
        run_train(train_config(tiny_run_inputs, out, **options))
    assert str(caught.value) == disk_full_message(out / "checkpoint-3")
    assert [p.name for p in checkpoints.scan(out)[0]] == ["checkpoint-2"] and not checkpoints.scan(out)[1]
    assert not (out / checkpoints.STAGING).exists() and not (out / "model").exists()

    monkeypatch.setattr(torch, "save", save)
    run_train(train_config(tiny_run_inputs, out, resume=True, **options))
    assert steps_of(out) == [1, 2, 3, 4]


def test_full_disk_while_writing_the_final_model(tiny_run_inputs, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def full_disk(self, folder, *args, **kwargs):
        if Path(folder).name != ".model.tmp":  # the checkpoints are written
            return save(self, folder, *args, **kwargs)
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "run"
    with pytest.raises(QTuneError) as caught:
        run_train(train_config(tiny_run_inputs, out, max_steps=1))
    assert str(caught.value) == disk_full_message(out / "model")
    assert not (out / "model").exists() and not (out / ".model.tmp").exists()
    assert [p.name for p in checkpoints.scan(out)[0]] == ["checkpoint-1"]


def test_disk_full_detection():
    assert checkpoints.is_disk_full(TORCH_DISK_FULL)
    assert checkpoints.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert checkpoints.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device "
                                                 "(os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("save failed") from exc
    except RuntimeError as wrapped:
        assert checkpoints.is_disk_full(wrapped)
    assert not checkpoints.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not checkpoints.is_disk_full(RuntimeError("CUDA out of memory"))


# --- two processes on one folder -----------------------------------------------------------------


@pytest.mark.slow
def test_a_second_train_on_the_same_folder_is_refused(tiny_run_inputs, tmp_path):
    """While one `qtune train` runs in OUT, another on OUT is refused before it touches anything."""
    model, data = tiny_run_inputs
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-m", "qtune.cli", "train", "--model", str(model), "--data", str(data),
                              "--out", str(out), "--method", "full", "--batch-size", "2", "--max-steps", "100000",
                              "--save-steps", "100000", "--no-progress"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not read_step_log(out / "steps.jsonl"):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        with pytest.raises(QTuneError, match=re.escape(f"output folder '{out}' is in use by process {first.pid} ")):
            run_train(train_config(tiny_run_inputs, out, max_steps=2))
        assert first.poll() is None  # the first run goes on ...
        steps = steps_of(out)
        assert steps == list(range(1, len(steps) + 1))  # ... alone in its step log
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK_FILE).exists()
    run_train(train_config(tiny_run_inputs, out, max_steps=2))  # a killed holder leaves no stale lock
    assert steps_of(out) == [1, 2]


# --- divergence ----------------------------------------------------------------------------------


def test_a_diverging_run_stops_with_one_line_and_saves_no_model(tiny_run_inputs, tmp_path):
    """At lr 1e4 the gradient norm is NaN at step 2 (the loss follows at step 3): the run stops
    there, before the optimizer moves, keeping checkpoint-1 and writing no model."""
    out = tmp_path / "run"
    with pytest.raises(QTuneError) as caught:
        run_train(train_config(tiny_run_inputs, out, method="full", lr=1e4, max_steps=5, save_steps=1))
    assert str(caught.value) == (
        "training diverged at step 2 (loss 6.397, gradient norm nan); stopped before updating the weights, no model "
        f"saved, the last good checkpoint is {out / 'checkpoint-1'}. Start again with a lower --lr (now 10000), or "
        "pass --nonfinite skip to skip such steps")
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert_finite(out / "checkpoint-1")
    assert steps_of(out) == [1]


def test_qtuning_divergence_is_reported_as_divergence(tiny_run_inputs, tmp_path):
    with pytest.raises(QTuneError, match=r"^training diverged at step 2 \(loss 6.397, gradient norm nan\)") as caught:
        run_train(train_config(tiny_run_inputs, tmp_path / "run", method="qtuning", lr=1e4, max_steps=5))
    assert "response token" not in str(caught.value)


def test_nonfinite_scores_count_as_divergence(tiny_run_inputs, tmp_path, monkeypatch):
    """A NaN perplexity from the scoring pass (here injected at step 2) stops the run as a
    diverged one, or, with nonfinite="skip", skips the step: nothing is trained in it."""
    import qtune.scorer
    from faults import nan_scores_at

    score_batch = qtune.scorer.score_batch
    monkeypatch.setattr(qtune.scorer, "score_batch", nan_scores_at(2, score_batch))
    with pytest.raises(QTuneError, match=r"^training diverged at step 2 \(the scoring pass gave a non-finite PPL or "
                                         r"entropy for 1 of 8 samples\); stopped before updating the weights"):
        run_train(train_config(tiny_run_inputs, tmp_path / "stop", method="qtuning", max_steps=3))

    monkeypatch.setattr(qtune.scorer, "score_batch", nan_scores_at(2, score_batch))  # its calls counted afresh
    summary = run_train(train_config(tiny_run_inputs, tmp_path / "skip", method="qtuning", max_steps=3,
                                     nonfinite="skip"))
    rows = read_step_log(tmp_path / "skip" / "steps.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["kept"] == 0 and rows[1]["kept_ids"] == [] and rows[1]["grad_norm"] == 0.0
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3


def test_skip_mode_skips_nonfinite_steps_without_moving_the_weights(tiny_run_inputs, tmp_path, capsys):
    """With nonfinite="skip" every step from the first non-finite one is skipped: no update, so
    the final weights are those of step 1, finite; the log and the summary count the steps."""
    out = tmp_path / "run"
    summary = run_train(train_config(tiny_run_inputs, out, method="full", lr=1e4, max_steps=5, save_steps=1,
                                     save_total_limit=5, nonfinite="skip"))
    rows = read_step_log(out / "steps.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, True, True, True]
    assert math.isnan(rows[1]["grad_norm"]) and math.isfinite(rows[0]["grad_norm"])
    assert summary["skipped_steps"] == 4 and summary["final_loss"] == rows[0]["loss"]
    assert "step 2 skipped: loss 6.397, gradient norm nan (--nonfinite skip)" in capsys.readouterr().err
    for folder in [out / "model", *out.glob("checkpoint-*")]:
        assert_finite(folder)
        assert_same_weights(folder, out / "checkpoint-1")


# --- resume with other options -------------------------------------------------------------------


def test_resume_with_other_options_is_refused_naming_them(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    run_train(train_config(tiny_run_inputs, out, method="random", max_steps=2, save_steps=1))
    assert json.loads((out / checkpoints.RUN_CONFIG).read_text())["lr"] == 1e-3

    def resume(**changes):
        options = {"method": "random", "max_steps": 2, "save_steps": 1, **changes}
        return run_train(train_config(tiny_run_inputs, out, resume=True, **options))

    with pytest.raises(QTuneError, match=r"--resume: the options differ from those in .*run_config.json: "
                                         r"lr 0.001 -> 0.01, method 'random' -> 'full'; lr, method cannot change on "
                                         r"resume \(start a new run in another --out\)$"):
        resume(lr=1e-2, method="full")
    with pytest.raises(QTuneError, match=r"max_steps 2 -> 4; to accept max_steps, pass --allow-config-change "
                                         r"max_steps$"):
        resume(max_steps=4)
    with pytest.raises(QTuneError, match=r"max_steps 2 -> 4, seed 0 -> 1; seed cannot change on resume \(start a "
                                         r"new run in another --out\)$"):
        resume(max_steps=4, seed=1, allow_config_change="max_steps")
    with pytest.raises(QTuneError, match="--allow-config-change: lr cannot change on resume; options that can: "
                                         "chunk_tokens, device, dtype, epochs"):
        resume(lr=1e-2, allow_config_change="lr,max-steps")
    assert steps_of(out) == [1, 2]  # nothing was touched

    # Options that cannot change what is trained are not compared.
    resume(logging_steps=5, progress=False, save_total_limit=3)
    summary = resume(max_steps=4, nonfinite="skip", allow_config_change="max-steps, nonfinite")
    assert summary["steps"] == 4 and steps_of(out) == [1, 2, 3, 4]
    assert json.loads((out / checkpoints.RUN_CONFIG).read_text())["max_steps"] == 4  # the next resume compares to 4


def test_config_change_rules_name_real_options():
    fields = set(TrainConfig.__dataclass_fields__)
    assert checkpoints.CHANGEABLE <= fields and checkpoints.NOT_COMPARED <= fields
    assert checkpoints.config_changes({"lr": 1.0, "out": "a", "gone": 1}, {"lr": 2.0, "out": "b", "new": 3}) == {
        "lr": (1.0, 2.0)}


# --- max steps -----------------------------------------------------------------------------------


def test_resume_from_the_last_step_trains_no_further(tiny_run_inputs, tmp_path):
    """max_steps=5 ends mid-epoch (6 steps per epoch): resuming from checkpoint-5 must not train
    a sixth step (transformers checks max_steps only after a step)."""
    out = tmp_path / "run"
    options = dict(method="random", max_steps=5, save_steps=5)
    run_train(train_config(tiny_run_inputs, out, **options))
    shutil.copytree(out / "model", tmp_path / "uninterrupted")
    summary = run_train(train_config(tiny_run_inputs, out, resume=True, **options))
    assert summary["steps"] == 5 and steps_of(out) == [1, 2, 3, 4, 5]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-5"]
    assert_same_weights(out / "model", tmp_path / "uninterrupted")
