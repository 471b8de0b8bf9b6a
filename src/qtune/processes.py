"""Whole-dataset passes on the processes a launcher started (`qtune score`, `qtune select`).

Under `torchrun` or `accelerate launch` every process runs the same command. A pass over the
dataset (scoring, a selector's forward passes) is then split by batches: the batches are built
once, the same on every process (length-bucketed, as one process builds them), and batch k is
run by process k mod world_size, so each sample is computed in exactly the batch, and so with
exactly the padding, that one process would give it: the gathered results equal one process's.
Uneven shares and empty ones (more processes than batches) work: a process without a batch in a
round still takes part in the round's count. Every process ends with the whole result (the
selectors' choice is deterministic, so all agree); the main process alone claims and writes the
output folder (`claim_output_on_main`).

The process group is accelerate's (`PartialState`, which reads the launcher's environment: gloo
on CPU, NCCL on GPUs); qtune adds no distributed layer of its own. Without a launcher
(`WORLD_SIZE` unset or 1) nothing is initialised and every helper is the one-process identity.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QTuneError
from .io import claim_output_dir
from .models import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones: rank (0 is the main process), world (how
    many), device (the one this process computes on: its own GPU under a launcher, else
    `--device`)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rounds(self, count: int) -> int:
        """Rounds needed for `count` batches, one batch per process a round."""
        return -(-count // self.world)

    def batch_of_round(self, round_index: int, count: int) -> int | None:
        """The batch this process runs in a round (round-robin), None when the batches ran out."""
        k = round_index * self.world + self.rank
        return k if k < count else None

    def total(self, value: int) -> int:
        """The sum of `value` over the processes (every process gets it)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(tensor)
        return int(tensor.item())

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Each of `params`' .grad replaced by its sum over the processes (one all-reduce of them
        all, flattened); a parameter without a gradient takes part as zeros. For a training step
        whose loss each process computed on its share of the rows (`qtune.selectors.less.warm_up`):
        the sum is the gradient of the whole step's loss."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).clone()

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        return gather(value)

    def from_main(self, value):
        """The main process's `value`, on every process."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def launcher_world_size() -> int:
    """The processes a launcher started (torchrun and accelerate launch set WORLD_SIZE), readable
    before torch.distributed is initialised; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def deepspeed_stage(config) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a dict or a JSON file), None when unreadable."""
    if isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    stage = (config or {}).get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else None


def launcher_engine_request() -> tuple[str, str] | None:
    """The sharded engine that `accelerate launch`'s environment asks for (its config's FSDP or
    DeepSpeed section), as ("fsdp<version>" or "zero<stage>" or "zero?", what asked for it); None
    without one (torchrun, a plain multi-process config, one process)."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
            stage = deepspeed_stage(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        return f"zero{stage if stage is not None else '?'}", "the accelerate config (DeepSpeed)"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}", "the accelerate config (FSDP)"
    return None


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """`obj` of every process, in rank order (a list of one without torch.distributed)."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out


def launched_processes(device: str = "auto", command: str = "this command") -> Processes:
    """The processes of this run: one (on `device`) without a launcher; under torchrun or
    accelerate launch, accelerate's process group (started here when not yet) and this process's
    device (its local GPU when `device` is auto and GPUs are there). Every process holds the whole
    model (the passes are data-parallel): a launch whose accelerate config asks for the parameters
    to be sharded (FSDP, DeepSpeed ZeRO-3, or a ZeRO stage that cannot be read) gets a one-line
    QTuneError naming `command` instead of a silent whole-model run on every process. ZeRO-1/2
    shard only what training holds (optimizer state, gradients), so they run as asked."""
    requested = launcher_engine_request()
    if requested is not None and requested[0] not in ("zero0", "zero1", "zero2"):
        raise QTuneError(
            f"{command} runs its passes data-parallel, with the whole model on every process, but {requested[1]} "
            f"asks for {requested[0].replace('zero', 'DeepSpeed ZeRO-').replace('fsdp', 'FSDP')}, which shards the "
            "parameters; sharded passes are not available yet: launch with torchrun or a multi-GPU accelerate "
            "config (the model must fit on one device), docs/scoring.md#several-processes")
    if launcher_world_size() <= 1:
        return Processes(device=resolve_device(device))
    from accelerate import PartialState

    # accelerate starts a CPU group (gloo) only when told the run is on CPU.
    state = PartialState(cpu=resolve_device(device).type == "cpu")
    end_process_group_at_exit()
    return Processes(rank=state.process_index, world=state.num_processes,
                     device=state.device if device == "auto" else resolve_device(device))


def run_batches(run: Callable[[list[int]], dict], batches: Sequence[list[int]], processes: Processes, *,
                progress_bar=None) -> dict:
    """`run(indices)` (one batch's results, a dict whose keys no other batch's share) over `batches`, batch k on
    process k mod world; every process returns the merged dict of all batches. `progress_bar`
    (a tqdm, the main process's; None elsewhere) advances by the samples all processes finished
    in each round, so it shows the whole dataset."""
    rows: dict = {}
    for round_index in range(processes.rounds(len(batches))):
        k = processes.batch_of_round(round_index, len(batches))
        if k is not None:
            rows.update(run(batches[k]))
        done = processes.total(0 if k is None else len(batches[k]))
        if progress_bar is not None:
            progress_bar.update(done)
    if processes.world > 1:
        merged: dict = {}
        for part in processes.gather(rows):
            merged.update(part)
        rows = merged
    return rows


@contextlib.contextmanager
def claim_output_on_main(processes: Processes, out: str | os.PathLike, command: str) -> Iterator[Path]:
    """`claim_output_dir(out)` held by the main process alone, for the whole `with` block; the
    other processes learn whether it could, and all stop with the main process's error when it
    could not (a busy or unwritable --out fails every process before anything loads)."""
    with contextlib.ExitStack() as stack:
        error = None
        if processes.is_main:
            try:
                stack.enter_context(claim_output_dir(out, command))
            except QTuneError as exc:
                error = str(exc)
        error = processes.from_main(error)
        if error is not None:
            raise QTuneError(error)
        yield Path(out)


#: Seconds the exit handler releases the GIL for before the interpreter's teardown (`_end_process_group`).
_COLLECTIVES_SETTLE_SECONDS = 0.2


def _end_process_group() -> None:
    """At the exit of a multi-process run, let the last collective's clean-up finish and end the
    process group while the interpreter is still whole.

    A gloo collective's work object is destroyed on gloo's own worker thread after the collective
    has completed, and when Python has already dropped its tensors, releasing them needs the GIL.
    A thread that asks for the GIL once the interpreter is finalizing is ended by an unwind that
    C++ cannot survive: the process aborts ("terminate called without an active exception",
    SIGABRT), failing the launch after every step and the save succeeded. It hit the process that
    exits first (not the main one, which still prints its summary), about one run in 15 on a busy
    2-core machine, and ending the group does not prevent it (gloo's threads outlive the group
    until its last reference goes). So the handler first sleeps, which releases the GIL to those
    threads for a moment that costs nothing beside a training run. Not after an uncaught
    exception: the other processes may still be inside a collective, and ending the group could
    wait on them."""
    if getattr(sys, "last_value", None) is not None:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        time.sleep(_COLLECTIVES_SETTLE_SECONDS)
        torch.distributed.destroy_process_group()


def end_process_group_at_exit() -> None:
    """Register `_end_process_group` at exit, once per process however many runs it makes."""
    atexit.unregister(_end_process_group)
    atexit.register(_end_process_group)
