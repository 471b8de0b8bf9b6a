"""The `qtune` command: `score` end to end, and one-line errors for bad input."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaForCausalLM

import qtune.workflows
from qtune.cli import main
from qtune.io import claim_output_dir


@pytest.fixture(scope="module")
def scored_inputs(tmp_path_factory, tiny_model_dir):
    """A folder with the tiny model (`model`) and 20 labelled GSM8K-style records (`data.jsonl`)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    with open(root / "data.jsonl", "w") as f:
        for i in range(20):
            category = "noise" if i % 4 == 0 else "clean"
            f.write(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}",
                                "metadata": {"category": category}}) + "\n")
    return root


def test_score_writes_parquet_summary_and_plot(scored_inputs, tmp_path, capsys):
    out = tmp_path / "score"
    code = main(["score", "--model", str(scored_inputs / "model"), "--data", str(scored_inputs / "data.jsonl"),
                 "--out", str(out), "--r-sample", "0.25", "--per-token", "--batch-size", "6"])
    assert code == 0
    table = pq.read_table(out / "scores.parquet").to_pydict()
    assert table["sample_id"] == list(range(20))
    assert sum(table["kept"]) == 5  # floor(0.25 * 20)
    assert set(table["quadrant"]) <= {0, 1, 2, 3, 4}
    assert set(table["category"]) == {"clean", "noise"}
    assert all(len(t) == n for t, n in zip(table["token_nll"], table["n_response"]))
    for ppl, nll in zip(table["ppl"], table["token_nll"]):
        assert ppl == pytest.approx(float(torch.tensor(nll).mean().exp()), rel=1e-5)
    assert (out / "eu_plane.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["kept"] == 5 and summary["n_samples"] == 20
    printed = capsys.readouterr().out
    assert "Q2 misconception" in printed and "noise" in printed and "tokens/s" in printed


def test_missing_model_is_one_line(scored_inputs, tmp_path, capsys):
    code = main(["score", "--model", str(tmp_path / "nope"), "--data", str(scored_inputs / "data.jsonl"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model path") and "does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenizer_without_pad_token_is_explained(scored_inputs, tmp_path, capsys, tiny_tokenizer):
    import copy

    folder = tmp_path / "nopad"
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(folder)
    LlamaForCausalLM.from_pretrained(scored_inputs / "model").save_pretrained(folder)
    args = ["score", "--model", str(folder), "--data", str(scored_inputs / "data.jsonl"), "--out", str(tmp_path / "o"),
            "--no-plot"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no pad token" in err and "--pad-token" in err and "Traceback" not in err
    assert main(args + ["--pad-token", "</s>"]) == 0


def test_dataset_without_usable_sample_is_explained(scored_inputs, tmp_path, capsys):
    data = tmp_path / "empty_answers.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": ""}) + "\n" for i in range(3)))
    code = main(["score", "--model", str(scored_inputs / "model"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no usable sample" in err


def test_malformed_record_names_file_and_line(scored_inputs, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{not json\n")
    base = ["score", "--model", str(scored_inputs / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
            "--no-plot"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert main(base + ["--skip-invalid"]) == 0
    assert "1" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "qtuning" in out and "random" in out and "full" in out


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if score or eval loads a tokenizer or a model."""
    def fail(*args, **kwargs):
        pytest.fail("loaded a tokenizer or a model before checking --out")

    monkeypatch.setattr(qtune.workflows, "load_tokenizer", fail)
    monkeypatch.setattr(qtune.workflows, "load_model", fail)


@pytest.mark.parametrize("command", ["score", "eval"])
def test_an_unusable_out_fails_before_anything_loads(scored_inputs, tmp_path, capsys, nothing_loads, command):
    base = [command, "--model", str(scored_inputs / "model"), "--data", str(scored_inputs / "data.jsonl")]
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(base + ["--out", str(blocker / "out")]) == 2
    assert capsys.readouterr().err == f"error: cannot create the output folder {str(blocker / 'out')!r}: Not a directory\n"
    assert main(base + ["--out", str(blocker)]) == 2
    assert capsys.readouterr().err == f"error: output folder {str(blocker)!r} exists and is not a folder\n"
    busy = tmp_path / "busy"
    with claim_output_dir(busy, "qtune score"):  # another command still writing there
        assert main(base + ["--out", str(busy)]) == 2
    assert f"error: output folder {str(busy)!r} is in use by process {os.getpid()} qtune score" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.parametrize("command", ["score", "eval"])
def test_a_read_only_out_fails_before_anything_loads(scored_inputs, tmp_path, capsys, nothing_loads, command):
    base = [command, "--model", str(scored_inputs / "model"), "--data", str(scored_inputs / "data.jsonl")]
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        assert main(base + ["--out", str(read_only / "out")]) == 2
        assert "cannot create the output folder" in capsys.readouterr().err
        assert main(base + ["--out", str(read_only)]) == 2
        assert "cannot write in the output folder" in capsys.readouterr().err
    finally:
        read_only.chmod(0o755)
