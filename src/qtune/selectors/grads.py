"""The `grads` selector (GrADS): keep_count(ratio, N) samples chosen by the magnitude of their
gradients on the embedding and LM-head weights after a short preliminary training, and by where
that magnitude lies in its estimated distribution (a Gaussian kernel density estimate).

Citation: GrADS, Liu, Wang, Liu, Song, Wang, Liu, Liu and Wang, "Learn More, Forget Less: A
Gradient-Aware Data Selection Approach for LLM", arXiv 2511.08620 (2025). Reimplemented from what
could be read of the paper; no code was read or copied (the abstract says the authors' code would
be released later). What could be read here is the abstract ("analyzing gradients obtained from a
preliminary training phase", "self-guided criteria that leverage the magnitude and statistical
distribution of gradients to prioritize examples that contribute the most to the model's learning
process", "representative samples", "5% of the selected GrADS data ... surpass ... the entire dataset", 50%
better still) and a third party's summary (sciencestack.ai): "extracting Embedding and LM Head
gradients after a brief one-epoch pre-training and employing a KDE-based PDF over the combined
gradient signal", robust "across ... LoRA-tuned and full-parameter setups". The method section
could not be read; every step below marked (assumed) is this implementation's reading:

1. Preliminary training: LESS's warm-up, shared (`less.warm_up_adapters`, `less.warm_up`): LoRA
   adapters (rank `grads_lora_r`, alpha 4 x rank, no dropout, on `grads_lora_target`) trained with
   AdamW (lr `grads_lr`, linear warm-up over 3% of the steps, then linear decay) for `grads_epochs`
   epochs (the summary's one epoch) on a seeded draw of keep_count(grads_fraction, N) samples
   (default every sample: assumed), `batch_size` samples a step (assumed: LoRA rather than full
   parameters, the rank, the rate and the schedule).
2. Per-sample gradients (`sample_gradient_magnitudes`), after the warm-up, in eval mode, one sample
   at a time, of the sample's mean token cross-entropy over its response tokens (assumed: the mean,
   as LESS), with respect to exactly two full weight matrices: the input embedding and the LM head
   (`gradient_weights`); the LoRA weights take no gradient then. A model whose head is tied to its
   embedding has one such matrix, whose gradient is the sum of both uses (what training it would
   see); its magnitude is that matrix's gradient norm. The statistic per sample
   (`gradient_magnitudes`): each matrix's gradient L2 norm, and the "combined gradient signal", the
   L2 norm of both gradients together, sqrt(|g_E|^2 + |g_H|^2) (assumed: the norm as the magnitude,
   and this combination). No gradient is kept: only these norms, so memory does not grow with N.
3. Distribution (`silverman_bandwidth`, `gaussian_kde`): a Gaussian KDE of the N combined
   magnitudes m_1..m_N, f(x) = 1 / (N h sqrt(2 pi)) sum_j exp(-(x - m_j)^2 / (2 h^2)), with
   Silverman's rule of thumb h = 0.9 min(sd, IQR / 1.34) N^(-1/5) (assumed: the kernel and the
   bandwidth rule), evaluated at every sample's own magnitude leaving that sample's own kernel out
   (`leave_one_out`, assumed: else an isolated sample, an outlier, would be credited with the height
   of its own kernel, 1 / (N h sqrt(2 pi)), as density).
4. Choice (`grads_choice`): the keep_count(ratio, N) highest values of (assumed, `grads_rank`):
   "mass" (default): m_i f(m_i), the density of gradient mass at the sample's magnitude, highest
   where the bulk of the learning signal lies: it drops the small gradients (already learned, little
   to learn from) and the rare outliers of the upper tail (unrepresentative, the likeliest to pull
   the model away from what it knew), the reading of "magnitude and statistical distribution" and
   "learn more, forget less" taken here; "density": f(m_i) alone, the most typical magnitudes;
   "magnitude": m_i alone, the largest gradients. Ties: the earlier sample first (`keep_top`).
   The count is keep_count(--ratio, N), as every selector's (assumed: the paper's "self-adaptive"
   subset size could not be read; its experiments report 5% and 50% subsets).

scores.parquet's score is each sample's combined gradient magnitude m_i (the statistic the KDE is
over); summary.json's stats give the bandwidth, the magnitudes' summary (and each matrix's mean),
the magnitude of highest density, whether the matrices are tied and the seconds of each stage,
so that the choice can be recomputed from scores.parquet (`grads_choice` on the scores).

The scoring model is left as it was: the adapters are removed afterwards (not merged) and every
parameter's requires_grad and the train/eval mode are restored. Under a launcher the warm-up's
steps (each process a share of each step's rows, the LoRA gradients summed: `less.step_gradient`)
and the per-sample gradients (runs of samples round-robin, the norms gathered) are shared out
over the processes; every process then computes the same KDE and choice.

Memory, besides the model: the LoRA weights and AdamW's moments (3P floats); during the gradient
pass the two gradient matrices (2 V x d floats of the model's dtype, one when tied; the chunked
head also builds its weight gradient, one more V x d) and a float32 block of at most
2^24 elements while a norm is summed; N x 3 float64 norms; the KDE a block of 2^22 float64
differences at a time. Time: the warm-up (grads_epochs x keep_count(grads_fraction, N) samples,
forward and backward), then one forward and one full backward per sample (down to the
embedding) plus a few passes over the two V x d gradients (filling them, summing their squares),
then the KDE: N^2 kernel evaluations (on the model's device, float64) up to KDE_EXACT_MAX
(20,000) samples, above it a binned estimate on 16,384 nodes, O(N + nodes log nodes)
(`binned_gaussian_kde`; its error against the exact sum is tested).
"""

from __future__ import annotations

import math
import time

import torch

from ..data import collate
from ..errors import QTuneError
from ..pruning import keep_count
from ..processes import Processes, run_batches
from .base import StaticChoice, keep_top, register_selector
from .less import warm_up, warm_up_adapters

#: Elements of a gradient summed at once in float32 when its norm is taken (64 MiB).
NORM_BLOCK = 1 << 24
#: Samples whose gradients one process computes between two gatherings (a step of the progress bar).
RUN_SAMPLES = 64
#: Float64 kernel evaluations of the KDE held at once (32 MiB).
KDE_BLOCK = 1 << 22
#: Above this many samples the KDE is binned (`binned_gaussian_kde`, linear in N), below it exact
#: (`gaussian_kde`, N^2 kernel evaluations: 4e8 at the threshold).
KDE_EXACT_MAX = 20_000
#: Nodes of the binned KDE's grid.
KDE_GRID = 1 << 14
#: What each `grads_rank` keeps, in words (StaticChoice.direction).
DIRECTIONS = {
    "mass": "highest gradient mass m x KDE density(m) of the embedding + LM-head gradient magnitude m (GrADS)",
    "density": "the most typical embedding + LM-head gradient magnitudes: highest KDE density (GrADS)",
    "magnitude": "the largest embedding + LM-head gradient magnitudes (GrADS)",
}


def gradient_magnitudes(gradients, *, block: int = NORM_BLOCK) -> tuple[list[float], float]:
    """(the L2 norm of each of `gradients`, the L2 norm of all of them together, sqrt of the sum of
    their squares): summed in float64 from float32 blocks of at most `block` elements."""
    squares = []
    for gradient in gradients:
        flat = gradient.detach().reshape(-1)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), block):
            total += flat[start:start + block].float().square().sum(dtype=torch.float64)
        squares.append(total.item())
    return [math.sqrt(s) for s in squares], math.sqrt(sum(squares))


def gradient_weights(model) -> tuple[list[torch.nn.Parameter], bool]:
    """([the input embedding's weight, the LM head's weight], False), or ([the one shared weight],
    True) when the head is tied to the embedding."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None or getattr(head, "weight", None) is None:
        raise QTuneError("the grads selector takes the gradients of the input embedding and the LM head: this "
                         "model does not expose both (get_input_embeddings / get_output_embeddings)")
    if head.weight is embedding.weight:
        return [embedding.weight], True
    return [embedding.weight, head.weight], False


def sample_gradient_magnitudes(model, weights, samples, pad_token_id, *, chunk_tokens=None, head_impl="auto",
                               processes: Processes | None = None, progress: bool = True) -> torch.Tensor:
    """Float64 [N, len(weights) + 1]: per sample (in `samples`' order), the L2 norm of the gradient
    of its mean token loss with respect to each of `weights`, then of all of them together
    (`gradient_magnitudes`). One sample at a time, the samples shared out over `processes` in
    runs of at most RUN_SAMPLES (`run_batches`; every process returns all rows); only `weights`
    should require gradients."""
    from tqdm.auto import tqdm

    from ..step import loss_token_count, micro_batch_loss

    processes = processes or Processes()
    device = weights[0].device

    def run(positions: list[int]) -> dict:
        rows = {}
        for i in positions:
            batch = {k: v.to(device) for k, v in collate([samples[i]], pad_token_id).items()}
            for weight in weights:
                weight.grad = None
            micro_batch_loss(model, batch, loss_token_count([batch]), chunk_tokens=chunk_tokens,
                             head_impl=head_impl).backward()
            norms, combined = gradient_magnitudes([w.grad for w in weights])
            rows[i] = [*norms, combined]
        return rows

    size = max(1, min(RUN_SAMPLES, -(-len(samples) // processes.world)))
    runs = [list(range(start, min(start + size, len(samples)))) for start in range(0, len(samples), size)]
    with tqdm(total=len(samples), desc="grads: per-sample gradients", unit="sample",
              disable=not (progress and processes.is_main)) as bar:
        rows = run_batches(run, runs, processes, progress_bar=bar if processes.is_main else None)
    for weight in weights:
        weight.grad = None
    return torch.tensor([rows[i] for i in range(len(samples))], dtype=torch.float64).reshape(len(samples), -1)


def silverman_bandwidth(values: torch.Tensor) -> float:
    """Silverman's rule of thumb, h = 0.9 min(sd, IQR / 1.34) n^(-1/5) (sd with n - 1, quartiles
    linearly interpolated); when one of sd and IQR / 1.34 is 0, the other; when both are (every
    value equal) or n < 2, 1.0 (every density is then equal whatever h)."""
    x = values.detach().double().flatten()
    if x.numel() < 2:
        return 1.0
    sd = x.std().item()
    upper, lower = torch.quantile(x, torch.tensor([0.75, 0.25], dtype=torch.float64)).tolist()
    iqr = (upper - lower) / 1.34
    spread = min(sd, iqr) if sd > 0 and iqr > 0 else max(sd, iqr)
    return 0.9 * spread * x.numel() ** -0.2 if spread > 0 else 1.0


def gaussian_kde(points: torch.Tensor, at: torch.Tensor, bandwidth: float, *, block: int = KDE_BLOCK) -> torch.Tensor:
    """Float64 [len(at)]: the Gaussian kernel density estimate of `points` with bandwidth h, at
    each of `at`: f(x) = 1 / (n h sqrt(2 pi)) sum_j exp(-(x - x_j)^2 / (2 h^2)); `block` kernel
    evaluations at a time, on `points`' device."""
    points = points.detach().double().flatten()
    at = at.detach().double().flatten().to(points.device)
    out = torch.empty(at.numel(), dtype=torch.float64, device=points.device)
    rows = max(1, block // max(1, points.numel()))
    for start in range(0, at.numel(), rows):
        z = (at[start:start + rows, None] - points[None, :]) / bandwidth
        out[start:start + rows] = torch.exp(-0.5 * z * z).sum(dim=1)
    return out / (points.numel() * bandwidth * math.sqrt(2 * math.pi))


def binned_gaussian_kde(points: torch.Tensor, at: torch.Tensor, bandwidth: float, *, grid: int = KDE_GRID) -> torch.Tensor:
    """Float64 [len(at)]: `gaussian_kde` approximated in O(n + grid log grid) instead of O(n x
    len(at)): the points are spread over `grid` equally spaced nodes spanning their range plus 8
    bandwidths on each side by linear binning (each point's unit weight split between its two
    nodes), the node weights are convolved with the kernel sampled at the nodes (by FFT), and the
    density at each of `at` is interpolated linearly between its two nodes. Its error against the
    exact sum falls with the node spacing over the bandwidth (tested at small n:
    tests/test_selector_grads.py)."""
    points = points.detach().double().flatten().cpu()
    at = at.detach().double().flatten().cpu()
    low = min(points.min().item(), at.min().item()) - 8 * bandwidth
    high = max(points.max().item(), at.max().item()) + 8 * bandwidth
    step = (high - low) / (grid - 1)
    position = (points - low) / step
    left = position.floor().long().clamp_(0, grid - 2)
    right_share = position - left
    weights = torch.zeros(grid, dtype=torch.float64)
    weights.index_add_(0, left, 1 - right_share).index_add_(0, left + 1, right_share)
    offsets = torch.arange(-(grid - 1), grid, dtype=torch.float64) * step  # every node difference
    kernel = torch.exp(-0.5 * (offsets / bandwidth) ** 2)
    size = 4 * grid  # room for the full linear convolution (length 3 grid - 2)
    smoothed = torch.fft.irfft(torch.fft.rfft(weights, size) * torch.fft.rfft(kernel, size), size)
    density = smoothed[grid - 1:2 * grid - 1] / (points.numel() * bandwidth * math.sqrt(2 * math.pi))
    where = (at - low) / step
    node = where.floor().long().clamp_(0, grid - 2)
    share = where - node
    return ((1 - share) * density[node] + share * density[node + 1]).clamp_(min=0.0)


def rank_values(magnitude: torch.Tensor, density: torch.Tensor, rank: str) -> torch.Tensor:
    """What `grads_rank` ranks by: "mass", magnitude x density; "density"; "magnitude"."""
    if rank == "mass":
        return magnitude.double() * density.double()
    if rank == "density":
        return density.double()
    if rank == "magnitude":
        return magnitude.double()
    raise ValueError(f"unknown grads_rank {rank!r}: mass, density or magnitude")


def leave_one_out(density: torch.Tensor, n: int, bandwidth: float) -> torch.Tensor:
    """The KDE of n points at each of them without that point's own kernel: (n f(x_i) - 1 / (h
    sqrt(2 pi))) / (n - 1), clamped at 0 (rounding); `density` itself when n < 2."""
    if n < 2:
        return density
    own = 1 / (bandwidth * math.sqrt(2 * math.pi))
    return ((n * density - own) / (n - 1)).clamp_(min=0.0)


def grads_choice(magnitude, count: int, rank: str = "mass", *, device="cpu") -> tuple[list[int], dict]:
    """(the positions of the `count` highest `rank_values` of the per-sample magnitudes, in position
    order, ties to the earlier; {"bandwidth", "density", "ranked"}): the density of a sample is the
    Gaussian KDE of the magnitudes, Silverman's bandwidth, at its magnitude, leaving its own kernel
    out (`leave_one_out`: an isolated sample is not credited with its own kernel's height),
    computed on `device`; binned above KDE_EXACT_MAX samples (`binned_gaussian_kde`)."""
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64).flatten()
    bandwidth = silverman_bandwidth(magnitude)
    if magnitude.numel() > KDE_EXACT_MAX:
        density = binned_gaussian_kde(magnitude, magnitude, bandwidth)
    else:
        density = gaussian_kde(magnitude.to(device), magnitude, bandwidth).cpu()
    density = leave_one_out(density, magnitude.numel(), bandwidth)
    ranked = rank_values(magnitude, density, rank)
    return keep_top(ranked.tolist(), count, highest=True), {"bandwidth": bandwidth, "density": density,
                                                           "ranked": ranked}


def grads_magnitudes(model, samples, cfg, pad_token_id, processes: Processes | None = None) -> tuple[torch.Tensor, dict]:
    """Float64 [N, k + 1] (k = 2, or 1 when tied): per sample of `samples` (in their order) its
    embedding and LM-head gradient norms and their combination, after the shared LoRA warm-up, and
    statistics; the warm-up's steps and the gradients shared out over `processes`, every process
    returning the whole. `model` is left as it was (adapters removed, requires_grad and mode
    restored)."""
    weights, tied = gradient_weights(model)
    started = time.perf_counter()
    with warm_up_adapters(model, r=cfg.grads_lora_r, target=cfg.grads_lora_target, seed=cfg.seed) as (peft_model, params):
        for _ in warm_up(peft_model, params, samples, fraction=cfg.grads_fraction, epochs=cfg.grads_epochs,
                         lr=cfg.grads_lr, batch_size=cfg.batch_size, seed=cfg.seed, pad_token_id=pad_token_id,
                         chunk_tokens=cfg.chunk_tokens, head_impl=cfg.head_impl, processes=processes):
            pass
        warmup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        peft_model.eval()
        for p in params:
            p.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        norms = sample_gradient_magnitudes(peft_model, weights, samples, pad_token_id, chunk_tokens=cfg.chunk_tokens,
                                           head_impl=cfg.head_impl, processes=processes,
                                           progress=getattr(cfg, "progress", True))
        gradient_seconds = time.perf_counter() - started
    stats = {"tied_embeddings": tied, "lora_parameters": sum(p.numel() for p in params),
             "warmup_samples": keep_count(cfg.grads_fraction, len(samples)), "warmup_epochs": cfg.grads_epochs,
             "warmup_seconds": warmup_seconds, "gradient_seconds": gradient_seconds}
    return norms, stats


@register_selector("grads")
class GradsSelector:
    """keep_count(ratio, N) samples by GrADS: embedding + LM-head gradient magnitude after a LoRA warm-up, ranked by magnitude x its KDE density"""

    needs = frozenset({"model"})
    shares_passes = True  # its warm-up and gradients go through the processes: every process calls choose

    def choose(self, cfg, inputs) -> StaticChoice:
        samples = inputs.samples
        norms, stats = grads_magnitudes(inputs.model, samples, cfg, inputs.pad_token_id, inputs.processes)
        # Rows in the order of scores.sample_id, so that "earlier" means what it does for keep_top.
        position = {samples[i]["sample_id"]: i for i in range(len(samples))}
        ids = list(inputs.scores.sample_id)
        norms = norms[torch.tensor([position[s] for s in ids], dtype=torch.long)]
        magnitude = norms[:, -1]
        started = time.perf_counter()
        kept, found = grads_choice(magnitude, keep_count(cfg.ratio, len(ids)), cfg.grads_rank,
                                   device=next(inputs.model.parameters()).device)
        densest = int(torch.argmax(found["density"]))  # the first of the highest
        stats.update(
            rank=cfg.grads_rank, bandwidth=found["bandwidth"], kde_seconds=time.perf_counter() - started,
            magnitude={"mean": magnitude.mean().item(), "sd": magnitude.std().item() if len(ids) > 1 else 0.0,
                       "min": magnitude.min().item(), "max": magnitude.max().item(),
                       "densest": magnitude[densest].item()},
        )
        if not stats["tied_embeddings"]:
            stats.update(embedding_magnitude_mean=norms[:, 0].mean().item(),
                         head_magnitude_mean=norms[:, 1].mean().item())
        return StaticChoice([ids[i] for i in kept], magnitude.tolist(), DIRECTIONS[cfg.grads_rank], stats)
