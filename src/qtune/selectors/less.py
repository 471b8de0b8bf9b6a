"""The `less` selector: keep_count(ratio, N) training samples whose gradients point where the
target set's do (`--target-data`, e.g. a dev split), the highest LESS scores.

Citation: LESS, Xia et al., "LESS: Selecting Influential Data for Targeted Instruction Tuning",
ICML 2024, arXiv 2402.04333 (Q-Tuning's Table 13 baseline). Reimplemented from the paper:

1. Warm-up: LoRA adapters (rank `less_lora_r`, alpha 4 x rank, no dropout, on `less_lora_target`)
   trained with AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay; lr `less_lr`, linear warm-up
   over floor(3%) of the steps, then linear decay to 0) for `less_epochs` epochs on a seeded
   uniform draw of keep_count(less_fraction, N) training samples, `batch_size` samples a step,
   each step's loss the mean over its response tokens. A checkpoint after each epoch.
2. At each checkpoint i, one gradient per sample of the LoRA weights (P of them), the loss being
   the sample's mean token cross-entropy (in eval mode, one sample at a time):
   - a training sample's feature is the update Adam would make with that gradient as its next
     step, from the optimizer's moments m, v after t steps (`adam_direction`): with
     m' = b1 m + (1 - b1) g and v' = b2 v + (1 - b2) g^2,
     Gamma = (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps);
   - a target sample's feature is its plain gradient g, as in the paper.
3. Each feature is projected to `less_dim` dimensions by one random Rademacher (+-1) matrix
   (`project`, seeded: the same matrix for every sample and checkpoint) and scaled to unit length,
   so that the inner products are cosine similarities (the paper's fix for short sequences'
   large gradients).
4. A training sample's score at checkpoint i is its mean cosine similarity to the target samples
   of a subtask (`--less-target-field`, a metadata field of the target records; default one
   task); the scores of the checkpoints are summed weighted by each epoch's mean learning rate
   (normalised by their sum, so that a score stays in [-1, 1]), and the sample's LESS score is
   its highest over the subtasks, as the paper's max over subtasks. The highest scores are kept;
   ties: the earlier sample first (`keep_top`).

Simplifications, against the paper: one model, no dropout in the adapters (the features are then
deterministic), no gradient clipping in the warm-up, `batch_size` samples a step (the paper's
effective batch is 128), the projection is generated here in blocks (TRAK's CUDA projector is not
used). The LoRA adapters are added to the scoring model for the selector's work and removed after
(`warm_up_adapters`): the model is left as it was.

Under a launcher (torchrun, accelerate launch) the work is shared out over the processes: each
warm-up step's rows (each process runs every world-th row and the LoRA gradients are summed,
`step_gradient`: every process then takes the same optimizer step) and the gradient passes (the
buffers of samples go round-robin, `shared_features`, and the features or scores are gathered).
Every process ends with the same scores, equal to one process's up to rounding (tested in 2 CPU
processes: tests/test_processes.py).

Memory: besides the model, the P LoRA weights and AdamW's two moments (3P floats), the selector
holds the gradients of one buffer of samples at once, max(batch_size, BUFFER_FLOATS / P) of them
(128 MiB of float32, or batch_size x P floats when P is larger) but at most BUFFER_SAMPLES, three
times that while the Adam direction is computed; one block of the projection, max(1,
BLOCK_FLOATS / less_dim) x less_dim floats (16 MiB), never the whole P x less_dim matrix; the
target samples' features (Q x less_dim), the subtasks' mean target features (subtasks x
less_dim) and the scores (N x subtasks, float64). Time: the warm-up, then per checkpoint one
forward and backward per training and target sample and 2 x P x less_dim flops per sample for the
projection, plus P x less_dim random draws per buffer of gradients.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ..data import collate
from ..errors import QTuneError
from ..pruning import keep_count
from ..processes import Processes, run_batches
from .base import StaticChoice, keep_top, register_selector

#: Floats of one block of the projection matrix, generated when needed and then dropped (16 MiB of
#: float32): the P x dim matrix is never held whole.
BLOCK_FLOATS = 1 << 22
#: Floats of per-sample gradients projected together (128 MiB of float32), unless `batch_size`
#: samples' hold more: each block of the projection is drawn once per such buffer, so larger
#: buffers draw fewer times.
BUFFER_FLOATS = 1 << 25
#: Samples in one buffer at most, whatever their size: a buffer is one step of the progress bar
#: and one batch of the share-out over processes.
BUFFER_SAMPLES = 256
#: AdamW's defaults, which the warm-up uses and the Adam direction must match.
BETAS = (0.9, 0.999)
EPS = 1e-8
#: Share of the warm-up's steps with a linearly rising learning rate (the paper's 3%).
WARMUP_SHARE = 0.03


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, *,
                   betas: tuple[float, float] = BETAS, eps: float = EPS) -> torch.Tensor:
    """The update (learning rate aside) Adam would make at its next step, step + 1, if `grad`
    ([..., P]) were that step's gradient, given its moments `exp_avg`, `exp_avg_sq` ([P]) after
    `step` steps: (m' / (1 - b1^(step+1))) / (sqrt(v' / (1 - b2^(step+1))) + eps), m' = b1 m +
    (1 - b1) grad, v' = b2 v + (1 - b2) grad^2 (the LESS paper's Gamma; torch.optim.Adam's update)."""
    b1, b2 = betas
    # Two tensors of grad's size besides grad itself, the rest in place.
    m = torch.add(exp_avg * b1, grad, alpha=1 - b1)
    v = torch.addcmul(exp_avg_sq * b2, grad, grad, value=1 - b2)
    v.div_(1 - b2 ** (step + 1)).sqrt_().add_(eps)
    return m.div_(1 - b1 ** (step + 1)).div_(v)


def project(rows: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """rows [B, P] @ R, float32 [B, dim]: R a P x dim matrix of independent +-1 entries, drawn block
    by block (max(1, BLOCK_FLOATS // dim) rows of R each, block k from a generator on `rows`'
    device seeded with (seed, k)), so that R depends on (seed, P, dim, device type) only: the
    same for every row, whatever the buffer it is projected in."""
    block = max(1, BLOCK_FLOATS // dim)
    out = torch.zeros(rows.shape[0], dim, dtype=torch.float32, device=rows.device)
    for k, start in enumerate(range(0, rows.shape[1], block)):
        width = min(block, rows.shape[1] - start)
        generator = torch.Generator(device=rows.device).manual_seed(seed * 1_000_003 + k)
        signs = torch.randint(0, 2, (width, dim), generator=generator, dtype=torch.float32, device=rows.device)
        out.addmm_(rows[:, start:start + width].float(), signs.mul_(2).sub_(1))
    return out


def _samples_gradients(model, params, samples, positions, pad_token_id, chunk_tokens, head_impl):
    """The gradient of each sample's mean token loss with respect to `params`, flattened: one
    float32 [P] per position of `samples`, in order."""
    from ..step import loss_token_count, micro_batch_loss

    device = params[0].device
    for i in positions:
        batch = {k: v.to(device) for k, v in collate([samples[i]], pad_token_id).items()}
        model.zero_grad(set_to_none=True)
        micro_batch_loss(model, batch, loss_token_count([batch]), chunk_tokens=chunk_tokens,
                         head_impl=head_impl).backward()
        yield torch.cat([p.grad.flatten().float() for p in params])


def unit_features(model, params, samples, part, cfg, pad_token_id, *, adam=None) -> torch.Tensor:
    """Float32 [len(part), less_dim]: the unit-length projected features of the samples at
    positions `part`, one buffer; `adam`: (exp_avg, exp_avg_sq, step) to precondition the
    gradients with (`adam_direction`), None for plain gradients."""
    n_params = sum(p.numel() for p in params)
    stacked = torch.empty(len(part), n_params, device=params[0].device)
    for row, gradient in enumerate(_samples_gradients(model, params, samples, part, pad_token_id,
                                                      cfg.chunk_tokens, cfg.head_impl)):
        stacked[row] = gradient
    if adam is not None:
        stacked = adam_direction(stacked, *adam)
    return torch.nn.functional.normalize(project(stacked, cfg.less_dim, cfg.seed), dim=1)


def feature_buffers(count: int, n_params: int, batch_size: int, world: int) -> list[list[int]]:
    """The positions 0..count-1 cut into the buffers whose gradients are projected together:
    max(batch_size, BUFFER_FLOATS / n_params) samples each, at most BUFFER_SAMPLES (so that the
    progress bar moves), and at most ceil(count / world) (so that every process gets a share)."""
    size = min(max(batch_size, BUFFER_FLOATS // n_params), BUFFER_SAMPLES, max(1, -(-count // world)))
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def shared_features(model, params, samples, cfg, pad_token_id, processes: Processes, *, then, adam=None,
                    desc: str) -> dict:
    """{position: then(its features)} for every sample of `samples`: the buffers
    (`feature_buffers`) shared out over `processes` (`run_batches`, every process gets the whole
    dict); `then` maps a buffer's features [b, less_dim] to one value per row (what is gathered:
    the features themselves, or the scores they give). A progress bar on the main process."""
    from tqdm.auto import tqdm

    buffers = feature_buffers(len(samples), sum(p.numel() for p in params), cfg.batch_size, processes.world)
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not processes.is_main)
    with bar:
        return run_batches(
            lambda part: dict(zip(part, then(unit_features(model, params, samples, part, cfg, pad_token_id, adam=adam)))),
            buffers, processes, progress_bar=bar if processes.is_main else None)


@contextlib.contextmanager
def warm_up_adapters(model, *, r: int, target: str, seed: int):
    """With (`model` with the warm-up's LoRA adapters, their weights): rank `r`, alpha 4 x r, no
    dropout, on the modules named in `target`, initialised from `seed` without touching the global
    random state. On exit `model` is as it was: the adapters removed (not merged), every
    parameter's requires_grad and the train/eval mode restored, no gradient left, so that any
    selector can run after. Shared by the `less` and `grads` selectors."""
    from ..train import apply_lora

    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the adapters' initialisation
        peft_model = apply_lora(model, r=r, alpha=4 * r, dropout=0.0, target=target)
    try:
        yield peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    finally:
        peft_model.zero_grad(set_to_none=True)
        peft_model.base_model.unload()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def warm_up(model, params, samples, *, fraction: float, epochs: int, lr: float, batch_size: int, seed: int,
            pad_token_id: int, chunk_tokens=None, head_impl: str = "auto", processes: Processes | None = None):
    """Train `params` (the LoRA weights of `warm_up_adapters`) on a seeded draw of
    keep_count(fraction, N) samples for `epochs` epochs: AdamW (betas 0.9, 0.999, eps 1e-8, no
    weight decay), peak `lr`, linear warm-up over floor(3%) of the steps then linear decay to 0,
    `batch_size` samples a step, each step's loss the mean over its response tokens. After each
    epoch (the model then in eval mode), yield (the epoch's mean learning rate, the optimizer).
    Under several `processes` each step's rows are shared out (`step_gradient`) and every process
    takes the same optimizer steps. Shared by the `less` and `grads` selectors."""
    from transformers import get_linear_schedule_with_warmup

    processes = processes or Processes()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(samples), generator=generator)[: keep_count(fraction, len(samples))]
    steps_per_epoch = math.ceil(chosen.numel() / batch_size)
    total = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP_SHARE * total), total)
    for _ in range(epochs):
        model.train()
        order = chosen[torch.randperm(chosen.numel(), generator=generator)].tolist()
        rates = []
        for start in range(0, len(order), batch_size):
            rates.append(optimizer.param_groups[0]["lr"])
            step_gradient(model, params, [samples[i] for i in order[start:start + batch_size]], processes,
                          pad_token_id=pad_token_id, chunk_tokens=chunk_tokens, head_impl=head_impl)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()  # the features are taken without dropout
        yield sum(rates) / len(rates), optimizer


def step_gradient(model, params, rows: list[dict], processes: Processes, *, pad_token_id: int, chunk_tokens=None,
                  head_impl: str = "auto") -> None:
    """The gradient of the mean response-token loss over `rows` (one warm-up step) into `params`'
    .grad. Under several processes each runs every world-th row, its summed token loss divided by
    all the rows' tokens, and the gradients are summed over the processes (`Processes.sum_gradients`,
    one all-reduce): the gradient one process computes on all the rows, up to rounding (each share
    is padded to its own longest row, which changes no loss), when the model has no dropout. A
    process without a row in the step runs nothing and adds zeros. Gradients left in `params` (the
    last sample's of a gradient pass between two epochs) are dropped first."""
    from ..step import loss_token_count, micro_batch_loss

    device = params[0].device
    for p in params:
        p.grad = None
    share = rows[processes.rank::processes.world]
    if share:
        batch = {k: v.to(device) for k, v in collate(share, pad_token_id).items()}
        tokens = loss_token_count([collate(rows, pad_token_id) if processes.world > 1 else batch])
        micro_batch_loss(model, batch, tokens, chunk_tokens=chunk_tokens, head_impl=head_impl).backward()
    processes.sum_gradients(params)


def target_tasks(metadata: list[dict], field: str | None) -> tuple[torch.Tensor, list[str]]:
    """(the subtask index of each target sample, the subtasks' names): one subtask without `field`."""
    if field is None:
        return torch.zeros(len(metadata), dtype=torch.long), ["all"]
    missing = [i for i, m in enumerate(metadata) if field not in m]
    if missing:
        raise QTuneError(f"--less-target-field {field!r}: {len(missing)} target records have no metadata[{field!r}] "
                         f"(the first is target sample {missing[0]})")
    names = sorted({str(m[field]) for m in metadata})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[str(m[field])] for m in metadata], dtype=torch.long), names


def less_scores(model, samples, target_samples, target_metadata, cfg, pad_token_id,
                processes: Processes | None = None) -> tuple[torch.Tensor, dict]:
    """Float64 [N]: the LESS score of each of `samples` (in their order), and statistics (see the
    module doc for the steps). Under several `processes` the warm-up's steps and the gradient
    passes are shared out (`warm_up`, `shared_features`) and every process returns the scores."""
    processes = processes or Processes()
    subtask, names = target_tasks(target_metadata, cfg.less_target_field)
    with warm_up_adapters(model, r=cfg.less_lora_r, target=cfg.less_lora_target, seed=cfg.seed) as (peft_model, params):
        totals, stats = _less_scores(peft_model, params, samples, target_samples, subtask, names, cfg, pad_token_id,
                                     processes)
    return totals.max(dim=1).values, stats


def _less_scores(model, params, samples, target_samples, subtask, names, cfg, pad_token_id, processes):
    """less_scores' steps 1-4 on `model` with its warm-up adapters `params`: (float64 [N, subtasks]
    the checkpoint-weighted similarities, statistics)."""
    device = params[0].device
    totals = torch.zeros(len(samples), len(names), dtype=torch.float64)
    weights, started, feature_seconds = 0.0, time.perf_counter(), 0.0
    epochs = warm_up(model, params, samples, fraction=cfg.less_fraction, epochs=cfg.less_epochs, lr=cfg.less_lr,
                     batch_size=cfg.batch_size, seed=cfg.seed, pad_token_id=pad_token_id,
                     chunk_tokens=cfg.chunk_tokens, head_impl=cfg.head_impl, processes=processes)
    for epoch, (rate, optimizer) in enumerate(epochs, 1):
        begun = time.perf_counter()
        target = shared_features(model, params, target_samples, cfg, pad_token_id, processes, then=lambda f: f.cpu(),
                                 desc=f"less: target gradients, checkpoint {epoch}")
        features = torch.stack([target[i] for i in range(len(target_samples))]).to(device)
        means = torch.zeros(len(names), cfg.less_dim, device=device).index_add_(0, subtask.to(device), features)
        means /= torch.bincount(subtask, minlength=len(names)).to(device)[:, None]
        state = [optimizer.state[p] for p in params]
        adam = (torch.cat([s["exp_avg"].flatten() for s in state]), torch.cat([s["exp_avg_sq"].flatten() for s in state]),
                int(state[0]["step"]))
        similarity = shared_features(model, params, samples, cfg, pad_token_id, processes, adam=adam,
                                     then=lambda f: (f @ means.T).double().cpu(),
                                     desc=f"less: training gradients, checkpoint {epoch}")
        totals += rate * torch.stack([similarity[i] for i in range(len(samples))])
        weights += rate
        feature_seconds += time.perf_counter() - begun
    stats = {"lora_parameters": sum(p.numel() for p in params), "checkpoints": cfg.less_epochs,
             "warmup_samples": keep_count(cfg.less_fraction, len(samples)), "target_samples": len(target_samples),
             "subtasks": names, "warmup_seconds": time.perf_counter() - started - feature_seconds,
             "gradient_seconds": feature_seconds}
    return totals / weights, stats


@register_selector("less")
class LessSelector:
    """keep_count(ratio, N) samples of highest LESS score: Adam-preconditioned LoRA gradients' cosine similarity to --target-data's"""

    needs = frozenset({"model", "target"})
    shares_passes = True  # its warm-up and gradient passes go through the processes: every process calls choose

    def choose(self, cfg, inputs) -> StaticChoice:
        samples = inputs.samples
        scores, stats = less_scores(inputs.model, samples, inputs.target_samples, inputs.target_metadata, cfg,
                                    inputs.pad_token_id, inputs.processes)
        by_id = dict(zip((samples[i]["sample_id"] for i in range(len(samples))), scores.tolist()))
        values = [by_id[s] for s in inputs.scores.sample_id]
        positions = keep_top(values, keep_count(cfg.ratio, len(values)), highest=True)
        return StaticChoice([inputs.scores.sample_id[i] for i in positions], values,
                            "highest gradient similarity to the target set (LESS)", stats)
