"""Each sample's logits matrix, summarised without materialising it: its nuclear norm (the sum of its
singular values) and a bilinear CountSketch of it, the two scores of UDS (`qtune.methods.uds`).

A sample's logits matrix over its n response-predicting positions is L = H W^T + 1 b^T (n x V): H the
hidden states at the head's input (n x d), W (V x d) and b (V) the output projection. With X = [H, 1]
(n x (d+1)) and F = [W, b] (V x (d+1)), L = X F^T, so

    L L^T = X G X^T,   G = F^T F   ((d+1) x (d+1), positive semidefinite).

For any M with M M^T = G (the Cholesky factor of G, or Q Lambda^(1/2) from its eigendecomposition
G = Q Lambda Q^T when G is singular), (X M)(X M)^T = L L^T. Two matrices with the same n x n Gram matrix
have the same singular values (the square roots of its eigenvalues), so

    ||L||_* = sum of the singular values of X M   (an n x (d+1) matrix), exactly.

G and its factor (float64) are computed once for each state of the head's weights (`LogitSummaries`
keeps them while the head's fingerprint, its storage and the float64 sum and sum of squares of its
entries, stays the same: once per step when the head trains, once for the whole run when it does
not, as with LoRA; the fingerprint costs 2 V (d+1), and an optimizer's fused kernels change
weights without bumping their version counters): V (d+1)^2 multiply-adds and (d+1)^3 / 3 for the
Cholesky factor; each sample then costs n (d+1)^2 for
X M and one SVD of an n x (d+1) matrix, O(n (d+1) min(n, d+1)), against n V (d+1) to materialise L
and O(n^2 V) for its SVD. Extra memory: the (d+1) x (d+1) factor and, while a batch is summarised,
its samples' X M zero-padded to the longest (zero rows add only zero singular values). A model whose
head cannot be split off (qtune.head) gives the logits themselves; their SVD is then taken directly.

The sketch of L is S = A L B (r1 x r2): B (V x r2) sends vocabulary entry v to column h2(v) with sign
s2(v), A (r1 x n) sends the j-th response position to row h1(j) with sign s1(j) (a CountSketch on each
side: one signed bucket per entry). For any fixed matrix M, E ||A M B||_F^2 = ||M||_F^2, so sketch
distances estimate the Frobenius distance between two logits matrices (a sample's j-th response
position meets the other's j-th; a shorter one counts zero rows). S is computed as
A (X (F^T B)): F^T B ((d+1) x r2) with G (V (d+1) additions), then n (d+1) r2 per sample. The
hashes are drawn from CPU generators seeded by `seed` (vocabulary) and by (seed, block) for each
block of POSITION_BLOCK positions, so every process and every pass uses the same A and B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Response positions whose row hashes one generator draws (a block's hashes never depend on how many
#: positions a pass needs).
POSITION_BLOCK = 1024
#: Vocabulary rows of the head read at once when G and F^T B are accumulated.
VOCABULARY_CHUNK = 8192
#: Separates the generator seeds of one sketch seed's vocabulary hash and its position blocks.
_SEED_STRIDE = 1_000_003


def _hash(generator: torch.Generator, n: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    bucket = torch.randint(buckets, (n,), generator=generator)
    sign = torch.randint(2, (n,), generator=generator).float().mul_(2).sub_(1)
    return bucket, sign


@dataclass(frozen=True)
class LogitSketch:
    """The bilinear CountSketch of a logits matrix: `rows` (r1, over response positions) x `columns`
    (r2, over the vocabulary), hashed from `seed`."""

    rows: int = 8
    columns: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"a sketch needs at least one row and one column, not {self.rows} x {self.columns}")

    @property
    def size(self) -> int:
        return self.rows * self.columns

    def vocabulary_hash(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(column int64 [V], sign float32 [V]) of B, on the CPU."""
        return _hash(torch.Generator().manual_seed(self.seed * _SEED_STRIDE), vocab, self.columns)

    def position_hash(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row int64 [n], sign float32 [n]) of A for response positions 0 .. n - 1, on the CPU."""
        parts = [_hash(torch.Generator().manual_seed(self.seed * _SEED_STRIDE + block + 1), POSITION_BLOCK, self.rows)
                 for block in range(-(-n // POSITION_BLOCK))]
        if not parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n]

    def matrices(self, n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r1 x n) and B (V x r2) as dense float64 matrices (for checking; the summaries never build them)."""
        left = torch.zeros(self.rows, n, dtype=torch.float64)
        row, sign = self.position_hash(n)
        left[row, torch.arange(n)] = sign.double()
        right = torch.zeros(vocab, self.columns, dtype=torch.float64)
        column, sign = self.vocabulary_hash(vocab)
        right[torch.arange(vocab), column] = sign.double()
        return left, right


def positions_in_sample(sample_of: torch.Tensor, n_samples: int) -> torch.Tensor:
    """int64 [n]: for rows whose sample is `sample_of` (each sample's rows consecutive, in order), each
    row's index within its sample."""
    counts = torch.bincount(sample_of, minlength=n_samples)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sample_of.numel(), device=sample_of.device) - starts[sample_of]


def gram_factor(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 M ((d+1) x k, or d x k without a bias) with M M^T = F^T F, F = [W, b]: the Cholesky
    factor of the Gram matrix, or Q Lambda^(1/2) (negative rounding clamped to 0) when it is singular."""
    columns = weight.shape[1] + (bias is not None)
    gram = torch.zeros(columns, columns, dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], VOCABULARY_CHUNK):
        part = slice(start, start + VOCABULARY_CHUNK)
        rows = _augmented(weight[part], None if bias is None else bias[part])
        gram.addmm_(rows.t(), rows)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt()


def _augmented(rows: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """float64 [rows, last] (a column of `last` appended; nothing when it is None)."""
    rows = rows.detach().double()
    return rows if last is None else torch.cat([rows, last.detach().double()[:, None]], dim=1)


def nuclear_norms(rows: torch.Tensor, sample_of: torch.Tensor, n_samples: int,
                  factor: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [n_samples]: the nuclear norm of each sample's matrix of `rows` times `factor` (rows [n, k],
    float; sample_of int64 [n], each sample's rows consecutive; None: the rows themselves). A sample
    without rows has norm 0."""
    counts = torch.bincount(sample_of, minlength=n_samples)
    longest = int(counts.max()) if counts.numel() else 0
    width = rows.shape[1] if factor is None else factor.shape[1]
    padded = torch.zeros(n_samples, longest, width, dtype=torch.float32, device=rows.device)
    product = rows.float() if factor is None else rows.float() @ factor.float()
    padded[sample_of, positions_in_sample(sample_of, n_samples)] = product
    return torch.linalg.svdvals(padded).sum(dim=1) if longest else padded.new_zeros(n_samples)


def sketches(projected: torch.Tensor, sample_of: torch.Tensor, n_samples: int, sketch: LogitSketch) -> torch.Tensor:
    """float32 [n_samples, r1 x r2]: each sample's A times its rows of `projected`, rows already times B
    (`projected` [n, r2])."""
    position = positions_in_sample(sample_of, n_samples)
    row, sign = sketch.position_hash(int(position.max()) + 1 if position.numel() else 0)
    row, sign = row.to(projected.device)[position], sign.to(projected.device)[position]
    out = torch.zeros(n_samples * sketch.rows, sketch.columns, dtype=torch.float32, device=projected.device)
    out.index_add_(0, sample_of * sketch.rows + row, projected.float() * sign[:, None])
    return out.view(n_samples, sketch.size)


def fingerprint(weight: torch.Tensor, bias: torch.Tensor | None) -> list[tuple[int, float, float]]:
    """The head's (storage address, float64 sum, float64 sum of squares) per tensor, read `VOCABULARY_CHUNK`
    rows at a time: any update of its weights changes it (but on a set of measure zero), version
    counter or not."""
    prints = []
    for tensor in (weight, bias):
        if tensor is None:
            continue
        sums = torch.zeros(2, dtype=torch.float64, device=tensor.device)
        for start in range(0, tensor.shape[0], VOCABULARY_CHUNK):
            part = tensor[start:start + VOCABULARY_CHUNK].detach().double()
            sums += torch.stack([part.sum(), part.square().sum()])
        prints.append((tensor.data_ptr(), *sums.tolist()))
    return prints


@dataclass
class LogitSummaries:
    """What the scoring pass adds for UDS, per sample: the nuclear norm of its logits matrix
    (`nuclear_norm`) and its sketch (`sketch`, None: not computed). The head's factors are kept while
    its fingerprint (`fingerprint`) is unchanged, so a scorer recomputes them once per step at most."""

    nuclear_norm: bool = False
    sketch: LogitSketch | None = None
    # (the head's fingerprint, (Gram factor, F^T B)) of the last head seen
    _head: tuple | None = field(default=None, repr=False)

    def of_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  sample_of: torch.Tensor, n_samples: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(nuclear norms [B] or None, sketches [B, r1 x r2] or None) of the logits matrices
        `hidden` W^T + b, from the hidden states [n, d] of the samples' response-predicting positions."""
        state = fingerprint(weight, bias)
        if self._head is None or self._head[0] != state:
            self._head = (state, self._head_factors(weight, bias))
        factor, projection = self._head[1]
        rows = hidden.detach().float()
        if bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        norms = nuclear_norms(rows, sample_of, n_samples, factor) if self.nuclear_norm else None
        sketched = (sketches(rows @ projection, sample_of, n_samples, self.sketch)
                    if self.sketch is not None else None)
        return norms, sketched

    def of_logits(self, logits: torch.Tensor, sample_of: torch.Tensor,
                  n_samples: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The same from the logits [n, V] themselves (a head that cannot be split off)."""
        logits = logits.detach()
        norms = nuclear_norms(logits, sample_of, n_samples) if self.nuclear_norm else None
        sketched = None
        if self.sketch is not None:
            column, sign = (t.to(logits.device) for t in self.sketch.vocabulary_hash(logits.shape[1]))
            projected = torch.zeros(logits.shape[0], self.sketch.columns, dtype=torch.float32, device=logits.device)
            projected.index_add_(1, column, logits.float() * sign)
            sketched = sketches(projected, sample_of, n_samples, self.sketch)
        return norms, sketched

    def _head_factors(self, weight, bias) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the Gram factor M, F^T B as float32 (d+1) x r2), each None when not needed."""
        factor = gram_factor(weight, bias) if self.nuclear_norm else None
        projection = None
        if self.sketch is not None:
            column, sign = (t.to(weight.device) for t in self.sketch.vocabulary_hash(weight.shape[0]))
            projection = torch.zeros(self.sketch.columns, weight.shape[1] + (bias is not None), dtype=torch.float64,
                                     device=weight.device)
            for start in range(0, weight.shape[0], VOCABULARY_CHUNK):
                part = slice(start, start + VOCABULARY_CHUNK)
                rows = _augmented(weight[part], None if bias is None else bias[part]) * sign[part, None].double()
                projection.index_add_(0, column[part], rows)
            projection = projection.t().float()
        return factor, projection
