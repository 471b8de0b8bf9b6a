"""The engine a training job runs on, and what qtune does alike under each (docs/distributed.md).

Engines (`ENGINES`): "single" (one process), "ddp" (torchrun or accelerate launch, every process
holding the whole model), "fsdp2" (FSDP2: parameters, gradients and optimizer state sharded;
`--fsdp` with `fsdp_version: 2`, or an accelerate FSDP config), "zero2" (DeepSpeed ZeRO-2:
gradients and optimizer state sharded) and "zero3" (DeepSpeed ZeRO-3: parameters too;
`--deepspeed FILE` or an accelerate DeepSpeed config). Every front end (`qtune train`,
`QTuneSFTTrainer`, `qtune rl`, the pipeline's stages) keeps the same contract:

- `check_engine`, once the Trainer has built its accelerator: the engine running is the one asked
  for, else a one-line `QTuneError` before the first step. accelerate silently runs an FSDP
  request as DDP where it cannot give FSDP (on CPU), and an unsupported variant (FSDP1, ZeRO-0/1,
  ZeRO-3 without 16-bit gathering on save) would train and then lose the model.
  In a multi-process run it also ends the process group at exit, before the interpreter's
  teardown (`qtune.processes.end_process_group_at_exit`).
- `save_trained_model`, called by every process: the full state dict is gathered (accelerate's
  `get_state_dict`: FSDP2's full state dict, ZeRO-3's 16-bit consolidation) and the main process
  writes OUT/model beside, checks that the written weights have the model's shapes, then swaps it
  in; a failure anywhere fails every process and leaves no partial OUT/model.
- Models run outside the engine's training wrapper: `frozen_for_engine` puts a frozen model (a
  reference) in an inference engine of its own under ZeRO-3 (which partitions every model loaded
  while it is on); `gathered_parameters` holds a ZeRO-3 model whole for work that is not in step
  across processes (`whole_model_work`); `engine_scope` ends a run's hold on the process (model
  loading, environment).
- `local_shards`: the part of each parameter this process holds, for norms summed over processes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

import torch

from .checkpoints import discard_on_failure
from .errors import QTuneError
from .io import replace_dir
from .processes import deepspeed_stage, end_process_group_at_exit, gather, launcher_engine_request

ENGINES = ("single", "ddp", "fsdp2", "zero2", "zero3")
#: Engines under which each process holds only a shard of the parameters.
SHARDED = ("fsdp2", "zero3")
#: The DeepSpeed option that makes ZeRO-3 gather the whole weights on save.
GATHER_16BIT = "stage3_gather_16bit_weights_on_model_save"
DOCS = "docs/distributed.md"


def requested_engine(args) -> tuple[str, str] | None:
    """The sharded engine that a run's `TrainingArguments` or its launcher (accelerate launch's
    environment, `qtune.processes.launcher_engine_request`) ask for, as ("fsdp<version>" or
    "zero<stage>" or "zero?", what asked for it); None when none is asked for (DDP or one process)."""
    if args.deepspeed:
        stage = deepspeed_stage(getattr(args, "hf_deepspeed_config", None) and args.hf_deepspeed_config.config)
        return f"zero{'?' if stage is None else stage}", f"--deepspeed {args.deepspeed}"
    if args.fsdp:
        return f"fsdp{(args.fsdp_plugin_args or {}).get('fsdp_version', 2)}", "--fsdp"
    return launcher_engine_request()


def running_engine(accelerator) -> str:
    """The engine `accelerator` runs: one of `ENGINES`, or "fsdp1" / "zero<stage>" for the
    variants qtune refuses."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    return "ddp" if accelerator.num_processes > 1 else "single"


def engine_refusal(requested: tuple[str, str] | None, running: str, deepspeed_config: dict | None = None) -> str | None:
    """Why a run must not start on `running` when `requested` was asked for (None: it may)."""
    if running == "fsdp1" or (requested and requested[0] == "fsdp1"):
        return ("FSDP1 is not one of qtune's engines (its flattened parameters hide the model's own); set "
                f"fsdp_version: 2 in the FSDP config ({DOCS})")
    if running.startswith("zero") and running not in ENGINES:
        return (f"DeepSpeed ZeRO stage {running[4:]} is not one of qtune's engines: use stage 2 (gradients and "
                f"optimizer state sharded) or 3 (parameters too), {DOCS}")
    if requested is not None:
        asked, where = requested
        if asked.startswith("fsdp") and not running.startswith("fsdp"):
            return (f"FSDP was asked for ({where}) but accelerate runs this job as {running}: it gives FSDP only to "
                    "GPU (or other accelerator) processes, never to a CPU run; on CPU use DDP or DeepSpeed "
                    f"(--deepspeed), see {DOCS}")
        if asked.startswith("zero") and running != asked and not (asked == "zero?" and running.startswith("zero")):
            return f"DeepSpeed {asked.replace('zero', 'ZeRO-')} was asked for ({where}) but this job runs as {running}"
    if running == "zero3" and (deepspeed_config or {}).get("zero_optimization", {}).get(GATHER_16BIT) is not True:
        return (f"DeepSpeed ZeRO-3 without {GATHER_16BIT}: the trained model could not be gathered into OUT/model; "
                f"set \"{GATHER_16BIT}\": true in the zero_optimization section (zero3_save_16bit_model: true in an "
                f"accelerate config), see {DOCS}")
    return None


def check_engine(args, accelerator) -> str:
    """The engine a Trainer runs (one of `ENGINES`), once it has built its accelerator; a one-line
    QTuneError where it is not the engine asked for, or not one qtune supports."""
    running = running_engine(accelerator)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    reason = engine_refusal(requested_engine(args), running, plugin.deepspeed_config if plugin else None)
    if reason:
        raise QTuneError(reason)
    if accelerator.num_processes > 1:
        end_process_group_at_exit()
    return running



def check_launcher(deepspeed: str | None) -> None:
    """DeepSpeed needs a launcher's environment even for one process (without one it looks for
    MPI); refuse before anything loads."""
    if deepspeed and "WORLD_SIZE" not in os.environ:
        raise QTuneError("--deepspeed needs a launcher, also for one process: torchrun --nproc_per_node 1 -m qtune.cli "
                         f"... (or accelerate launch, deepspeed), see {DOCS}")


#: Environment variables that accelerate sets for an engine given by the Trainer's arguments and
#: never unsets (later runs in the process would take them for a launcher's request).
_ENGINE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@contextlib.contextmanager
def engine_scope():
    """Around one training run in a process that may run others after it (the pipeline's stages, a
    script, the tests): afterwards the engine environment is the launcher's again and models load
    whole again (transformers partitions every model loaded while a ZeRO-3 config is registered)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved = {name: os.environ.get(name) for name in _ENGINE_ENV}
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- parameters that this process holds only a shard of -------------------------------------------


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter as the model defines it, also where this process holds a shard
    (ZeRO-3 keeps it as `ds_shape`; an FSDP2 DTensor reports it)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def local_shards(params) -> list[torch.Tensor]:
    """The part of each parameter this process holds: ZeRO-3's partition, FSDP2's local shard, or
    the whole tensor. Summed over processes (sharded engines only), their squares give the norm."""
    out = []
    for p in params:
        if hasattr(p, "ds_tensor"):
            out.append(p.ds_tensor)
        elif hasattr(p, "to_local"):
            out.append(p.to_local())
        else:
            out.append(p)
    return out


def frozen_for_engine(model, accelerator):
    """A frozen model (a reference) ready for forward passes under the running engine: under ZeRO-3,
    which partitioned it at load, wrapped in a DeepSpeed inference engine of its own (stage 3, no
    optimizer) that gathers each layer's weights as its forward reaches it, as the trained model's
    does; elsewhere the model as it is (whole on every process). Every process must call it, after
    the Trainer has set DeepSpeed up (its config's "auto" values are filled then)."""
    if running_engine(accelerator) != "zero3":
        return model
    import deepspeed

    if isinstance(model, deepspeed.DeepSpeedEngine):  # made ready by an earlier train()
        return model
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for training_only in ("optimizer", "scheduler"):
        config.pop(training_only, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def whole_model_work():
    """Inside, transformers treats models as whole, also while a ZeRO-3 run has its config
    registered, under which it would build and load every model partitioned over the processes and
    make `generate` wait for every process at each token: both are collectives, which processes
    working out of step (the main process alone, each process on its own share) never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


@contextlib.contextmanager
def gathered_parameters(model):
    """Inside the block every process holds the whole weights of `model`, a model that ZeRO-3
    partitioned at load and no engine wraps yet, so that work out of step with the other processes
    (a pass on the main process only) can run it (`whole_model_work`): the partitions are gathered
    on entering (every process must enter) and dropped on leaving. Costs the whole model's memory
    while inside. Models that are not partitioned pass through."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())), whole_model_work():
        yield model


# --- OUT/model ----------------------------------------------------------------------------------


def _adapter_shapes(model, adapter: str) -> dict[str, tuple[int, ...]]:
    """The full shape of each of `adapter`'s weights, keyed as PEFT saves them (adapter name left out)."""
    return {name.replace(f".{adapter}.", "."): full_shape(p) for name, p in model.named_parameters()
            if f".{adapter}." in name}


def _model_shapes(model) -> dict[str, tuple[int, ...]]:
    """The full shape of each parameter of a transformers model, keyed as it saves them (tied aliases
    included; PEFT's `base_layer` wrapping left out)."""
    return {name.replace(".base_layer", ""): full_shape(p)
            for name, p in model.named_parameters(remove_duplicate=False) if "lora_" not in name}


def check_saved_weights(folder: Path, expected: dict[str, tuple[int, ...]], target: Path) -> None:
    """QTuneError (naming `target`, the folder they are for) unless the safetensors files in
    `folder` hold weights of the model: no empty tensor (a ZeRO-3 partition saved without
    gathering), every tensor named as a parameter of the model with that parameter's full shape,
    and at least one such tensor. Reads the files' headers only."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    found = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                want = expected.get(key)
                if want is not None and shape != want:
                    raise QTuneError(f"the model written for {target} has {key} of shape {list(shape)}, not the "
                                     f"model's {list(want)}: the weights were not gathered whole; nothing was saved")
                if 0 in shape:
                    raise QTuneError(f"the model written for {target} has an empty {key}: the weights were not "
                                     "gathered whole; nothing was saved")
                found += want is not None
    if not found:
        raise QTuneError(f"the model written for {target} holds none of the model's weights; nothing was saved")


def _tied_weights_once(model, state: dict) -> dict:
    """`state` with each weight that the model ties to another (an output projection tied to the
    embedding) under its first name only, as transformers saves tied weights: gathering (ZeRO-2's
    copies, FSDP2's full state dict) makes them separate tensors, which it would save twice."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            aliases.add(name)
    return {k: v for k, v in state.items() if k not in aliases}


def _merged_copy(unwrapped, state: dict, adapter: str):
    """The model with `adapter` merged into its base weights, built on the CPU from the gathered
    `state` (the trained model's own weights are shards under FSDP2 and ZeRO-3)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = unwrapped.get_base_model()
    with whole_model_work(), torch.device("meta"):
        copy_model = get_peft_model(AutoModelForCausalLM.from_config(base.config), unwrapped.peft_config[adapter],
                                    adapter_name=adapter)
    wanted = copy_model.state_dict()
    copy_model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True, assign=True)
    copy_model.get_base_model().tie_weights()  # the loaded copies of tied weights are one again
    return copy_model.merge_and_unload()


def _write_model(unwrapped, state: dict, tokenizer, tmp: Path, target: Path, *, merge_lora: bool,
                 sharded: bool) -> None:
    """The main process's part of `save_trained_model`: the content of `target` in `tmp`, checked."""
    adapter = getattr(unwrapped, "active_adapter", None) if hasattr(unwrapped, "peft_config") else None
    if adapter is not None and merge_lora:
        if sharded:
            model = _merged_copy(unwrapped, state, adapter)
        else:  # the trained model holds its whole weights: merged in place (the run is over)
            model = unwrapped.merge_and_unload(adapter_names=[adapter])
        model.save_pretrained(tmp, safe_serialization=True)
        expected = _model_shapes(model)
    elif adapter is not None:
        # The trained adapter only (qtune rl's frozen `ref` copy of it under a KL term left out).
        unwrapped.save_pretrained(tmp, state_dict=state, selected_adapters=[adapter], safe_serialization=True)
        expected = _adapter_shapes(unwrapped, adapter)
    else:
        unwrapped.save_pretrained(tmp, state_dict=_tied_weights_once(unwrapped, state), safe_serialization=True)
        expected = _model_shapes(unwrapped)
    tokenizer.save_pretrained(tmp)
    check_saved_weights(tmp, expected, target)


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def save_trained_model(accelerator, model, tokenizer, folder: Path, *, merge_lora: bool = False) -> Path:
    """Write a trained model to `folder` (OUT/model), under any engine; every process must call it.

    Every process joins the gathering of the full state dict (`accelerator.get_state_dict`; `model`
    as the Trainer wraps it, `model_wrapped`); when it failed on any process, every process raises
    and nothing is written. The main process writes the weights (safetensors; for a PEFT model its
    active adapter, or the base weights with it merged under `merge_lora`) and the tokenizer beside
    `folder`, checks that the written weights have the model's full shapes
    (`check_saved_weights`), then swaps them in (`io.replace_dir`); when that fails, every process
    raises and `folder` is the previous one or absent. Returns `folder`."""
    tmp = folder.parent / f".{folder.name}.tmp"
    # Failures are agreed on through a gather, so that no process waits for one that failed.
    try:
        state, failure, cause = accelerator.get_state_dict(model), None, None
    except Exception as exc:  # out of memory, a failed transfer: the run's environment, one line
        state, failure, cause = None, _describe(exc), exc
    failures = [(rank, f) for rank, f in enumerate(gather(failure)) if f]
    if failures:
        rank, what = failures[0]
        raise QTuneError(f"saving {folder}: gathering the trained weights failed on process {rank} ({what}); no model "
                         "was written (the checkpoints are complete: --resume continues from the last one)") from cause
    error, raised = None, None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        sharded = running_engine(accelerator) in SHARDED
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with discard_on_failure(tmp, folder):
                _write_model(unwrapped, state, tokenizer, tmp, folder, merge_lora=merge_lora, sharded=sharded)
            replace_dir(tmp, folder)
        except QTuneError as exc:  # a full disk, weights that are not the model's: they name the folder
            error, raised = str(exc), exc
        except Exception as exc:  # a bug: the main process keeps its traceback, the others stop with one line
            error, raised = f"saving {folder} failed on the main process: {_describe(exc)}", exc
    error = gather(error)[0]
    if raised is not None:
        raise raised
    if error:
        raise QTuneError(error)
    return folder
