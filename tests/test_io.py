"""Output folders: the exclusive claim (lock + write check) and the one-line disk-full error;
reading back JSON-lines files that a killed writer left; the mode of atomically written files."""

import errno
import os
import signal
import stat
import subprocess
import sys

import pytest

from qtune.cli import main
from qtune.errors import QTuneError
from qtune.io import LOCK_FILE, claim_output_dir, read_jsonl, write_text

HOLDER = """
import sys, time
from qtune.io import claim_output_dir
with claim_output_dir(sys.argv[1], "holder"):
    print("ready", flush=True)
    time.sleep(60)
"""


def _hold(folder):
    """A second process that claims `folder` and sleeps; returns once it holds the claim."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_claim_creates_the_folder_and_records_the_owner(tmp_path):
    out = tmp_path / "a" / "b"
    with claim_output_dir(out, "train") as folder:
        assert folder == out and out.is_dir()
        assert (out / LOCK_FILE).read_text().split() == [str(os.getpid()), "train"]
        write_text(out / "x.txt", "ok")
    with claim_output_dir(out):  # released on exit: a later run may claim it again
        pass


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(QTuneError, match=rf"in use by process {holder.pid} holder"):
            with claim_output_dir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claim_output_dir(tmp_path):  # the kernel dropped the dead holder's lock; its stale file is harmless
        pass


def test_the_same_folder_cannot_be_claimed_twice_in_one_process(tmp_path):
    with claim_output_dir(tmp_path):
        with pytest.raises(QTuneError, match="in use by process"):
            with claim_output_dir(tmp_path):
                pass
        with claim_output_dir(tmp_path / "cell-1"):  # nested folders are independent claims
            pass


def test_an_unusable_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(QTuneError, match="exists and is not a folder"):
        with claim_output_dir(blocker):
            pass
    with pytest.raises(QTuneError, match="cannot create the output folder"):
        with claim_output_dir(blocker / "below"):
            pass


def test_disk_full_anywhere_is_one_line(monkeypatch, tmp_path, capsys):
    import qtune.workflows

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "scores.parquet"))

    monkeypatch.setattr(qtune.workflows, "run_score", full)
    code = main(["score", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no space left on the device while writing") and "scores.parquet" in err


def test_read_jsonl_skips_the_partial_lines_a_killed_writer_leaves(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert read_jsonl(path) == []  # missing file: no records
    # A writer killed mid-line leaves '{"cell": 2, "ac'; the next append starts after it.
    path.write_text('{"cell": 1}\n{"cell": 2, "ac{"cell": 3}\n\n{"cell": 4}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"cell": 1}, {"cell": 4}]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_get_the_mode_a_plain_open_would_give(tmp_path, umask, mode):
    """Not the temporary file's owner-only 0600: a run's outputs and the model cache are read by
    whoever the umask lets read them."""
    old = os.umask(umask)
    try:
        write_text(tmp_path / "out.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
