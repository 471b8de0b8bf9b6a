"""The prompts of `qtune rl`: records with a checkable reference answer, rendered as `qtune eval`
renders them, and the start model (full weights or a LoRA adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..console import log
from ..data import Record, load_records, record_id_of, tokenize_records
from ..errors import DataError, QTuneError
from ..evaluate import build_prompts, extract_strict, gold_answer
from ..models import check_vocabulary, load_model, load_tokenizer

#: The file that marks a folder as a PEFT adapter.
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class PromptSet:
    """Prompts and their answers, in file order: `sample_id` (the record's position in its file),
    `prompt` (the text the model continues), `answer` (the reference's final answer, normalised by
    `gold_answer`). The columns of the dataset that GRPOTrainer reads; `records`, the records
    themselves (their reference answers are the expert demonstrations of `demonstrations`)."""

    sample_id: list[int]
    prompt: list[str]
    answer: list[str]
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_id)

    def subset(self, keep: list[bool]) -> PromptSet:
        """The prompts where `keep` is true, in the same order."""
        columns = (self.sample_id, self.prompt, self.answer, self.records)
        return PromptSet(*([v for v, k in zip(column, keep) if k] for column in columns))

    def columns(self) -> dict[str, list]:
        return {"sample_id": self.sample_id, "prompt": self.prompt, "answer": self.answer}


def without_added_bos(text: str, tokenizer) -> str:
    """`text` without its leading BOS when the tokenizer adds one itself on encoding (TRL encodes
    text prompts with the tokenizer's special tokens; `render_prompt` already wrote the BOS the
    template asks for), so the model sees one BOS, as in `qtune eval`."""
    bos = tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return text
    ids = tokenizer(text[len(bos):])["input_ids"]
    return text[len(bos):] if ids[:1] == [tokenizer.bos_token_id] else text


def load_prompts(path, tokenizer, *, format: str = "auto", skip_invalid: bool = False,
                 limit: int | None = None) -> PromptSet:
    """Every record of `path` as a prompt (its conversation before the last assistant turn, rendered
    by `qtune.evaluate.build_prompts`) and the final answer of that turn.

    A record whose last turn is not the assistant's, or whose reference has no `#### N` line, has no
    answer a reward can check: DataError naming the file and the record, or, with `skip_invalid`,
    skipped and counted."""
    records, report = load_records(path, format, skip_invalid=skip_invalid, limit=limit)
    usable, skipped = [], []
    for record in records:
        messages = record.messages
        reason = None
        if messages[-1]["role"] != "assistant":
            reason = "the last turn must be the assistant's reference answer"
        elif extract_strict(messages[-1]["content"]) is None:
            reason = "the reference answer has no '#### N' line, so no reward can check a completion against it"
        if reason is None:
            usable.append(record)
        elif skip_invalid:
            skipped.append(record.sample_id)
        else:
            raise DataError(path, f"record {record.sample_id + 1}", reason)
    if report.skipped or skipped:
        log(f"{report.summary()}; {len(skipped)} more without a checkable answer skipped")
    if not usable:
        raise QTuneError(f"{path}: no record with a checkable answer")
    prompts = [without_added_bos(text, tokenizer) for text in build_prompts(usable, tokenizer)]
    return PromptSet([r.sample_id for r in usable], prompts,
                     [gold_answer(r.messages[-1]["content"]) for r in usable], usable)


def demonstrations(records: list[Record], tokenizer, max_length: int) -> dict[int, dict]:
    """The expert demonstrations of `records` by sample_id: each record tokenized as `qtune train`
    tokenizes it (`qtune.data.tokenize_records`: the same rendering, labels on the assistant turns
    only, cut at `max_length` tokens), so its reference answer follows its prompt as SFT trained
    it. A conversation the chat template splits per assistant turn gives its last turn's sample (the
    reference after the whole conversation); a record left without a labelled token (its prompt
    fills max_length) has none."""
    samples, _ = tokenize_records(records, tokenizer, max_length=max_length)
    return {record_id_of(s["sample_id"]): s for s in sorted(samples, key=lambda s: s["sample_id"])}


def model_folder(path: str) -> str:
    """The model folder of a start: `path` itself, or `path/model` for a qtune train output folder."""
    folder = Path(path).expanduser()
    nested = folder / "model"
    if not (folder / "config.json").exists() and not (folder / ADAPTER_CONFIG).exists() and nested.is_dir():
        return str(nested)
    return str(path)


def load_policy(path: str, *, trust_remote_code: bool = False, pad_token: str | None = None):
    """(model, tokenizer, is_adapter) of a start model, on the CPU in float32 (the Trainer moves it).

    A LoRA adapter folder loads its base model (`base_model_name_or_path` of its adapter config)
    and the adapter on top, trainable: RL continues training the adapter. Anything else is loaded
    as full weights (`qtune.models.load_model`)."""
    folder = model_folder(path)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, pad_token=pad_token)
    if not (Path(folder).expanduser() / ADAPTER_CONFIG).exists():
        model = load_model(folder, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
        check_vocabulary(model, tokenizer, folder)
        return model, tokenizer, False
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(str(Path(folder).expanduser())).base_model_name_or_path
    if not base_path:
        raise QTuneError(f"the adapter in {folder} does not name its base model (base_model_name_or_path)")
    base = load_model(base_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    check_vocabulary(base, tokenizer, folder)
    model = PeftModel.from_pretrained(base, str(Path(folder).expanduser()), is_trainable=True)
    return model, tokenizer, True
