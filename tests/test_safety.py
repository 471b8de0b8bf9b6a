"""Safe by default: shipped model code never runs unasked, weights are never unpickled, YAML
configs cannot build Python objects."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from qtune.cli import main
from qtune.errors import QTuneError
from qtune.models import load_model


class _Trap:
    """Unpickling this touches a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_code_shipped_with_a_model_does_not_run_without_trust_remote_code(tmp_path, tiny_model_dir):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "modeling_trap.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                             "from transformers import LlamaForCausalLM as TrapModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_trap.TrapModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        load_model(str(folder), device="cpu")
    except QTuneError:
        pass  # refusing is as good as ignoring the code; running it is not
    assert not marker.exists()


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    torch.save({"trap": _Trap(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(QTuneError, match="could not load a model"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


def test_yaml_config_cannot_build_python_objects(tmp_path, capsys):
    marker = tmp_path / "yaml-ran"
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    code = main(["train", "--config", str(config), "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "not valid YAML" in err
    assert not marker.exists()
