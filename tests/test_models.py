"""Model loading faults become one-line errors: a truncated weights file, a short embedding."""

import json
import shutil

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.cli import main
from qtune.errors import QTuneError
from qtune.models import check_vocabulary, load_model, load_tokenizer, machine_stamp


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """`truncated`: the tiny model with half of model.safetensors cut off; `short`: a model whose
    embedding has fewer rows than its tokenizer has tokens; `data.jsonl`: 4 records."""
    root = tmp_path_factory.mktemp("broken")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.vocab_size = len(tiny_tokenizer) - 10
    LlamaForCausalLM(config).save_pretrained(root / "short")
    tiny_tokenizer.save_pretrained(root / "short")
    (root / "data.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
        for i in range(4)))
    return root


def test_truncated_weights_are_named_not_a_traceback(broken_models):
    with pytest.raises(QTuneError, match="weights of .*truncated.* are unreadable"):
        load_model(str(broken_models / "truncated"), device="cpu")


def test_short_embedding_is_refused(broken_models):
    path = str(broken_models / "short")
    with pytest.raises(QTuneError, match=r"has \d+ tokens but the model's embedding only \d+ rows"):
        check_vocabulary(load_model(path, device="cpu"), load_tokenizer(path), path)


@pytest.mark.parametrize("command", ["score", "eval", "train"])
@pytest.mark.parametrize("model", ["truncated", "short"])
def test_every_command_reports_a_broken_model_in_one_line(broken_models, tmp_path, capsys, command, model):
    args = [command, "--model", str(broken_models / model), "--data", str(broken_models / "data.jsonl"),
            "--out", str(tmp_path / "out")]
    args += {"score": ["--no-plot"], "eval": ["--max-new-tokens", "2"], "train": ["--max-steps", "1"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert ("unreadable" if model == "truncated" else "embedding only") in errors[0]
    assert not (tmp_path / "out" / "model").exists()


def test_the_machine_stamp_names_torchs_cpu_threads():
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert machine_stamp("cpu", 2).endswith(f"cpu x 2, torch {torch.__version__}, 1 cpu threads")
    finally:
        torch.set_num_threads(threads)
