"""Test-only: lets the 2-process CPU tests run FSDP2 (tests/test_engines.py puts this folder on the
PYTHONPATH of the FSDP2 launches only, so Python imports it at start-up in each process).

accelerate gives FSDP only to processes on GPUs or other accelerators: a CPU run with an FSDP
plugin stays MULTI_CPU and trains as DDP (qtune refuses that, `qtune.engine.check_engine`). FSDP2
itself runs on CPU over gloo, so the tests switch accelerate's state to FSDP when a CPU run is
given an FSDP plugin; everything after that (sharding, steps, checkpoints, saving) is the product's
path. qtune never does this itself."""

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
