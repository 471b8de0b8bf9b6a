"""Q-Tuning for TRL users: `QTuneSFTTrainer` is `trl.SFTTrainer` with qtune's pruning step.

A TRL script changes one class and sets the pruning fields in its config:

    from qtune.trl_sft import QTuneSFTConfig, QTuneSFTTrainer

    args = QTuneSFTConfig(output_dir="out", method="qtuning", r_sample=0.25, r_token=0.7)
    trainer = QTuneSFTTrainer(model="Qwen/Qwen3-0.6B", args=args, train_dataset=dataset)
    trainer.train()

TRL prepares the data as usual (`messages`, prompt-completion, plain text; chat templates,
`completion_only_loss`, `assistant_only_loss`, truncation) and its collator pads the batches.
The positions TRL gives a label (not -100) are the response tokens that qtune scores and prunes,
so prompt and non-assistant tokens never receive loss. The pruning hooks are `QTuneTrainer`'s,
reached by cooperative inheritance: `QTuneTrainer` comes first in the MRO and forwards the
constructor's arguments to `SFTTrainer`, whose own `super()` calls reach `transformers.Trainer`.
The loss is qtune's (mean over the kept tokens of the whole step), so label smoothing and TRL's
entropy/token-accuracy metrics do not apply to training, and TRL's `loss_type="dft"` is refused
in favour of qtune's `loss="dft"` (`qtune.objectives`), which applies to the kept tokens.

Samples need no `sample_id` column: each row of `train_dataset` gets its index as its id before
TRL prepares it (a `sample_id` column of the user's is kept), so the step log names the same
sample the same way in every epoch and on every process. The ground-truth controls (`oracle`,
`oracle_ratio`, `anti_oracle`) read each row's `metadata` column, keyed by that id.

Refused at construction: `packing` (a packed row mixes samples, which sample pruning cannot
separate) and `padding_free` (its batches are one flattened row, without the per-sample rows the
step selects from).
"""

from __future__ import annotations

import dataclasses
import typing

import torch
import trl

from .config import ComputeConfig, LossConfig, ParallelConfig, PruningConfig, ScorerConfig
from .data import require_pad_token
from .errors import QTuneError
from .methods import build_method
from .models import load_model
from .objectives import Objective
from .pretrained import resolve_model_path
from .reference_policy import reference_policy
from .scorer import build_scorer
from .trainer import QTuneTrainer


@dataclasses.dataclass
class _QTuneOptions(ScorerConfig, ComputeConfig, LossConfig, PruningConfig):
    """The options qtune adds to an SFTConfig: the pruning method, the output-projection path, the
    scores' source and the token objective."""


def _check_qtune_fields(config) -> None:
    """SFTConfig's own checks, then qtune's on the pruning fields (one-line OptionError)."""
    trl.SFTConfig.__post_init__(config)
    names = [f.name for f in dataclasses.fields(_QTuneOptions)]
    checked = _QTuneOptions(**{name: getattr(config, name) for name in names})
    for name in names:
        setattr(config, name, getattr(checked, name))


def _qtune_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """qtune's pruning options as fields for an SFTConfig subclass. A name SFTConfig already has
    (`seed`) stays TRL's: one seed for the run. The metadata keeps only what `HfArgumentParser`
    (TrlParser) passes to argparse; the value checks run in `_check_qtune_fields`."""
    taken = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    hints = typing.get_type_hints(_QTuneOptions)
    fields = []
    for f in dataclasses.fields(_QTuneOptions):
        if f.name in taken:
            continue
        metadata = {"help": f.metadata["help"]}
        if f.metadata.get("choices"):
            metadata["choices"] = f.metadata["choices"]
        fields.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=metadata)))
    return fields


# TrainingArguments' field with qtune's default (`qtune.config.ParallelConfig` says why it is off).
_FIND_UNUSED = dataclasses.fields(ParallelConfig)[
    [f.name for f in dataclasses.fields(ParallelConfig)].index("ddp_find_unused_parameters")]

# Built from PruningConfig and ComputeConfig so that each option is declared and documented once, in qtune.config.
QTuneSFTConfig = dataclasses.make_dataclass(
    "QTuneSFTConfig",
    [*_qtune_fields(), ("ddp_find_unused_parameters", bool | None,
                        dataclasses.field(default=_FIND_UNUSED.default, metadata={"help": _FIND_UNUSED.metadata["help"]}))],
    bases=(trl.SFTConfig,),
    namespace={
        "__module__": __name__,  # the Trainer pickles its args into checkpoints
        "__doc__": "`trl.SFTConfig` plus qtune's pruning options (`qtune.config.PruningConfig`: method, "
                   "r_sample, r_token, lam, ...), output-projection options (`qtune.config.ComputeConfig`: "
                   "head_impl, chunk_tokens) and the scores' source (`qtune.config.ScorerConfig`: score_layers, "
                   "rescore_drift) and the token objective (`qtune.config.LossConfig`: loss, "
                   "loss_alpha, loss_threshold), checked as qtune checks them.",
        "__post_init__": _check_qtune_fields,
    },
)


def _metadata_by_id(dataset) -> dict[int, dict]:
    """sample_id -> the row's `metadata` ({} where the row or the dataset has none), for the controls
    that read it (`Method.needs_metadata`)."""
    ids = dataset["sample_id"]
    metadata = dataset["metadata"] if "metadata" in dataset.column_names else [None] * len(ids)
    return {int(i): m or {} for i, m in zip(ids, metadata)}


def _index_as_id(example: dict, index: int) -> dict:
    return {"sample_id": index}


def _with_sample_ids(dataset):
    """The dataset with a `sample_id` column: the user's, else each row's index."""
    if dataset is None or "sample_id" in (dataset.column_names or []):
        return dataset
    return dataset.map(_index_as_id, with_indices=True)


class _CollateWithIds:
    """The collator (TRL's or the user's) plus the batch's `sample_id` tensor, which the pruning
    step logs and carries through packing. Evaluation datasets are not pruned and carry no ids."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        if "sample_id" not in examples[0]:
            return self.collate(examples)
        batch = self.collate([{k: v for k, v in e.items() if k != "sample_id"} for e in examples])
        batch["sample_id"] = torch.tensor([e["sample_id"] for e in examples], dtype=torch.long)
        return batch


class QTuneSFTTrainer(QTuneTrainer, trl.SFTTrainer):
    """`trl.SFTTrainer` whose steps train only what the configured pruning method keeps.

    Takes SFTTrainer's arguments; `args` must be a `QTuneSFTConfig`. Step records go to
    `output_dir/steps.jsonl` (as with `qtune train`) and the pruning statistics to the logs."""

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, **kwargs):
        if not isinstance(args, QTuneSFTConfig):
            raise QTuneError("QTuneSFTTrainer needs args=QTuneSFTConfig(...), an SFTConfig with qtune's pruning "
                             f"options; got {type(args).__name__}")
        if args.packing:
            raise QTuneError("QTuneSFTTrainer does not support packing=True: a packed row mixes samples, which "
                             "sample pruning cannot separate; set packing=False")
        if args.loss_type != "nll":
            raise QTuneError(f"QTuneSFTTrainer computes its own loss on the kept tokens: set loss={args.loss_type!r} "
                             f"(qtune's token objective) instead of loss_type={args.loss_type!r}")
        if args.padding_free:
            raise QTuneError("QTuneSFTTrainer does not support padding_free=True: pruning selects rows of a "
                             "padded batch; set padding_free=False")
        if isinstance(model, str):  # TRL loads a model given by name: a name qtune knows, or a .gguf file, too
            model = resolve_model_path(model)
        train_dataset = _with_sample_ids(train_dataset)
        method = build_method(args.method, args)
        if method.needs_metadata:
            method.bind_records(_metadata_by_id(train_dataset))
        super().__init__(
            model, args, data_collator, train_dataset,
            method=method,
            pad_token_id=None,  # known once SFTTrainer has built its collator, below
            triage_scope=args.triage_scope,
            chunk_tokens=args.chunk_tokens,
            head_impl=args.head_impl,
            kept_row_layout=args.kept_row_layout,
            keep_checkpoints=args.save_total_limit,
            **kwargs,
        )
        # The id TRL's collator pads with (its pad_token option, the tokenizer's, else EOS); with a
        # collator of the user's, the tokenizer's.
        self.pad_token_id = getattr(self.data_collator, "pad_token_id", None)
        if self.pad_token_id is None:
            self.pad_token_id = require_pad_token(getattr(self.processing_class, "tokenizer", self.processing_class))
        self.objective = Objective.of(args)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        dtype = "bfloat16" if args.bf16 else "float32"
        self.reference = reference_policy(self.objective, self.model, lambda: self._starting_weights(dtype))
        self.scorer = build_scorer(args, tokenizer, self.args.device, needs=method.needs, dtype=dtype)
        self.pass_scorer = lambda device: build_scorer(args, tokenizer, device, needs=method.pass_needs, dtype=dtype,
                                                       training_set_pass=True)
        self.data_collator = _CollateWithIds(self.data_collator)

    def _starting_weights(self, dtype: str):
        """A frozen copy of the model's starting weights (loss="asft" without a PEFT adapter), loaded again
        from the path it was loaded from."""
        path = getattr(self.model.config, "name_or_path", "")
        if not path:
            raise QTuneError("loss='asft' on a fully fine-tuned model anchors to its starting weights, loaded again "
                             "from the model's name_or_path, which this model lacks: load it by path, or train a "
                             "PEFT adapter (peft_config=...)")
        return load_model(path, dtype=dtype, device=str(self.args.device))

    def _set_signature_columns_if_needed(self):
        # `remove_unused_columns` keeps only these columns of the prepared dataset.
        super()._set_signature_columns_if_needed()
        if "sample_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "sample_id"]
