"""Wall time and peak device memory per phase of a training step, as the paper's Table 6 splits
them: the scoring pass, the method's decision (sample triage and token selection), packing the
kept rows, the training forward and backward, and the optimizer.

On CUDA every phase boundary synchronises the device (kernels run asynchronously: without it a
phase would be charged for the kernels of the one before) and the peak is
`torch.cuda.max_memory_allocated` over the phase; elsewhere only time is measured (a process's
peak RSS never goes down, so it cannot be split by phase).
"""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseClock:
    """Accumulates seconds (and on CUDA peak allocated bytes) per named phase. Phases may nest:
    an outer phase's peak includes its inner phases'."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._open: list[list] = []  # [name, start, peak so far] of the phases now running

    def _sync_peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    @contextlib.contextmanager
    def phase(self, name: str):
        peak = self._sync_peak()
        for outer in self._open:  # the reset below would lose the outer phases' peaks so far
            outer[2] = max(outer[2], peak)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        entry = [name, time.perf_counter(), 0]
        self._open.append(entry)
        try:
            yield
        finally:
            peak = max(entry[2], self._sync_peak())
            self._open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - entry[1]
            if self.cuda:
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)
                for outer in self._open:
                    outer[2] = max(outer[2], peak)

    def add(self, seconds: dict[str, float]) -> None:
        """Add seconds measured elsewhere (a method's own stages)."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def take(self) -> dict:
        """`{"phase_seconds": {...}, "phase_peak_mib": {...}}` (the latter on CUDA only), and start over."""
        out: dict = {"phase_seconds": dict(self.seconds)}
        if self.cuda:
            out["phase_peak_mib"] = {k: v / 2**20 for k, v in self.peak_bytes.items()}
        self.seconds, self.peak_bytes = {}, {}
        return out
