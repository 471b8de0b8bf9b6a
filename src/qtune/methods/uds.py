"""The `uds` sample rule, after UDS (Zou et al., "Utility-Diversity Aware Online Batch Selection for LLM
Supervised Fine-tuning", arXiv 2510.16882, ICML 2026): Q-Tuning's closest rival, an online batch
selector from the current model's logits, with no reference model and no extra backward pass.

Each sample i of the step gets

    s_i = ||L_i||_*  +  uds_alpha x mean over m in the buffer of ||S(L_i) - m||_2

L_i its logits matrix over its response-predicting positions (current weights, from the scoring pass),
||L_i||_* its nuclear norm (utility and intra-sample diversity: large for a sample whose positions
predict confidently and differently), S(L_i) a low-dimensional sketch of it (`qtune.logit_matrix`),
and the buffer the sketches of the last `uds_buffer` kept samples, earlier steps first (inter-sample
diversity: far from what was trained recently). An empty buffer (the first step) gives diversity 0.
The k = keep_count(r_sample, N) samples of highest s_i are kept (ties: the earlier sample first);
their sketches then enter the buffer in the step's order, the oldest leaving beyond `uds_buffer`.

How this differs from the authors' code (github.com/gfyddha/UDS, read to understand, not copied):
- the logits matrix covers the response-predicting positions (those whose tokens receive loss), not
  every position of the padded row; the authors train on their inputs too (`train_on_inputs`);
- the nuclear norm is exact and computed from the hidden states through the head's Gram matrix
  (`qtune.logit_matrix`), not by an SVD of the materialised logits;
- the sketch is a bilinear CountSketch, norm-preserving in expectation, where the authors use a
  subsampled real Fourier transform on each side (of the logits padded to the cutoff length T) whose
  scale multiplies distances by about sqrt(V T) / 2: their alpha of 2.5e-3 is about 11 in this rule's
  units for their setting (V = 152,064, T = 512), hence the default `uds_alpha`;
- the decision is over the optimizer step's samples (every micro-batch; under global triage, every
  process's), as every rule of this project, where the authors select within each micro-batch.

The buffer is the rule's state (`SketchBuffer`): saved with each checkpoint, and the same on every
process under global triage, since every process pushes the same kept samples of the gathered batch.
"""

from __future__ import annotations

import base64

import torch

from ..config import UdsConfig
from ..pruning import keep_count
from .rules import RuleState, SampleChoice, SampleRule, register_sample_rule, top_samples


class SketchBuffer(RuleState):
    """The sketches of the last `size` kept samples, oldest first (float32 [m, D], m <= size, on the CPU)."""

    def __init__(self, size: int):
        self.size = size
        self.sketches = torch.zeros(0, 0)

    def mean_distances(self, sketches: torch.Tensor) -> torch.Tensor:
        """float64 [N]: the mean Euclidean distance of each of `sketches` [N, D] to the buffer's; 0 when
        the buffer is empty."""
        if not len(self.sketches):
            return torch.zeros(sketches.shape[0], dtype=torch.float64)
        return torch.cdist(sketches.double(), self.sketches.double()).mean(dim=1)

    def push(self, sketches: torch.Tensor) -> None:
        """Append `sketches` [k, D] in order; the oldest leave beyond `size`."""
        held = self.sketches if len(self.sketches) else sketches.new_zeros(0, sketches.shape[1])
        self.sketches = torch.cat([held, sketches.float().cpu()])[-self.size:].clone()

    def state_dict(self) -> dict:
        data = self.sketches.contiguous().numpy().astype("<f4").tobytes()
        return {"shape": list(self.sketches.shape), "float32": base64.b64encode(data).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        data = bytearray(base64.b64decode(state["float32"]))
        self.sketches = torch.frombuffer(data, dtype=torch.float32).reshape(state["shape"]).clone()


@register_sample_rule("uds")
class UdsSamples(SampleRule):
    """keep_count(r_sample, N) samples of highest logits nuclear norm + uds_alpha x distance to earlier kept ones"""

    config_class = UdsConfig
    needs = frozenset({"nuclear_norm", "logit_sketch"})

    def new_state(self, cfg) -> SketchBuffer:
        return SketchBuffer(cfg.uds_buffer)

    def choose(self, cfg, view):
        utility = view.sample_scores("nuclear_norm").double()
        sketches = view.sample_scores("logit_sketch")
        diversity = view.state.mean_distances(sketches)
        kept = top_samples(utility + cfg.uds_alpha * diversity, keep_count(cfg.r_sample, utility.numel()),
                           highest=True)
        view.state.push(sketches[kept])
        return SampleChoice(kept, None, {"uds_utility": float(utility[kept].mean()),
                                         "uds_diversity": float(diversity[kept].mean()),
                                         "uds_buffer": len(view.state.sketches)})
