"""One linear layer at a time: magnitude, Wanda and SparseGPT masks (unstructured or N:M).

Each method sees the layer's weight ``W [out, in]`` and, for Wanda and SparseGPT, statistics of
the inputs ``X [tokens, in]`` the layer received on calibration text:

- magnitude: ``|W|``, one threshold over the whole matrix (per layer);
- Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, compared within each output row (or each run
  of M inputs of a row for N:M); weights are not changed;
- SparseGPT (Frantar & Alistarh 2023): the OBS reconstruction with the inverse Hessian of
  ``||W X^T - W' X^T||^2`` (``H = X^T X``, damped by 1% of its mean diagonal), column by column
  in blocks of 128: each block's mask is chosen by ``w^2 / [H^-1]_jj^2``, and every pruned weight's
  error is spread over the columns not yet visited. The kept weights change.

Masks are True where a weight is kept, as in :mod:`compile_toolkit.pruning.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import CtkError
from ..unstructured import layer_magnitude_mask, n_m_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
BLOCKSIZE = 128
PERCDAMP = 0.01


@dataclass
class InputStats:
    """Running statistics of a linear layer's inputs: what Wanda (squared column norms) and
    SparseGPT (``X^T X``) need, accumulated batch by batch so calibration never holds all of X."""

    features: int
    hessian: bool
    tokens: int = 0
    sq_norms: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.sq_norms = torch.zeros(self.features, dtype=torch.float64)
        self.xtx = torch.zeros(self.features, self.features) if self.hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.features).float()
        self.tokens += x.shape[0]
        self.sq_norms += (x.double() ** 2).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x


def prune_weight(
    weight: torch.Tensor,
    method: str,
    sparsity: float,
    n_m: tuple[int, int] | None,
    stats: InputStats | None,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, mask)`` for ``weight [out, in]``: ``n_m=(n, m)`` keeps ``n`` of every ``m``
    consecutive inputs of each row, otherwise ``sparsity`` of the weights go. ``stats`` are the
    layer's input statistics (unused by magnitude)."""
    w = weight.detach().float()
    if method == "magnitude":
        mask = n_m_mask(w, *n_m, name=name) if n_m else layer_magnitude_mask(w, sparsity)
        return w * mask, mask
    if stats is None:
        raise CtkError(f"{method} needs calibration statistics for {name}")
    if method == "wanda":
        mask = wanda_mask(w, stats.sq_norms, sparsity, n_m, name)
        return w * mask, mask
    if method == "sparsegpt":
        return sparsegpt(w, stats, sparsity, n_m, name)
    raise CtkError(f"unknown LLM pruning method {method!r}; choose from {', '.join(METHODS)}")


def wanda_mask(
    weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, name: str
) -> torch.Tensor:
    """Keep the largest ``|W_ij| * ||X_j||`` of each output row (of each run of M for N:M)."""
    score = weight.abs() * sq_norms.sqrt().to(weight.dtype).unsqueeze(0)
    if n_m:
        return n_m_mask(score, *n_m, name=name)
    count = int(weight.shape[1] * sparsity)
    mask = torch.ones_like(weight, dtype=torch.bool)
    if count:
        lowest = torch.sort(score, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, lowest, False)
    return mask


def sparsegpt(
    weight: torch.Tensor, stats: InputStats, sparsity: float, n_m: tuple[int, int] | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's ``fasterprune`` (blocksize 128, percdamp 0.01) on one weight matrix."""
    columns = weight.shape[1]
    if stats.tokens < columns:
        raise CtkError(f"sparsegpt: {name} has {columns} inputs but calibration gave {stats.tokens} tokens; "
                       f"its Hessian needs at least {columns} (more calibration samples or longer sequences)")
    w = weight.clone()
    h = stats.xtx / stats.tokens
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += PERCDAMP * torch.diag(h).mean() * torch.eye(columns)
    try:
        # H^-1 from its Cholesky factor; cholesky_solve against I, because torch.cholesky_inverse
        # (LAPACK potri) is 10-30x slower on this CPU for the same result (to 3e-7).
        inverse = torch.cholesky_solve(torch.eye(columns), torch.linalg.cholesky(h))
        hinv = torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as error:
        raise CtkError(f"sparsegpt: the Hessian of {name} is not positive definite after damping ({error})") from None
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, BLOCKSIZE):
        i2 = min(i1 + BLOCKSIZE, columns)
        # The block is transposed (one input column per row): the column-by-column updates then
        # touch contiguous memory, an order of magnitude faster on CPU than strided columns.
        w1, hinv1 = w[:, i1:i2].T.contiguous(), hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        mask1 = _block_mask(w1, diag, sparsity) if n_m is None else torch.zeros_like(w1, dtype=torch.bool)
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                score = w1[i : i + m] ** 2 / diag[i : i + m].unsqueeze(1) ** 2
                mask1.scatter_(0, i + torch.topk(score, m - n, dim=0, largest=False).indices, True)
            q = w1[i].masked_fill(mask1[i], 0)
            err = (w1[i] - q) / diag[i]
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1)
            w1[i] = q
            err1[i] = err
        w[:, i1:i2] = w1.T
        pruned[:, i1:i2] = mask1.T
        w[:, i2:] -= err1.T @ hinv[i1:i2, i2:]
    keep = ~pruned
    return w * keep, keep


def _block_mask(w1: torch.Tensor, diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured: prune the ``sparsity`` of a (transposed) block with the lowest OBS error
    ``w^2 / [H^-1]_jj^2``; True where pruned."""
    score = w1**2 / diag.unsqueeze(1) ** 2
    mask = torch.zeros_like(w1, dtype=torch.bool)
    count = int(score.numel() * sparsity)
    if count:
        mask.view(-1)[torch.sort(score.flatten(), stable=True).indices[:count]] = True
    return mask
