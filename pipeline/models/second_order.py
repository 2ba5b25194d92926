"""Second-order pooling of visual tokens and its fast singular-value power normalisation (SVPN).

The So-ViT head pools the visual tokens into a cross-covariance matrix Q (d1 x d2) and normalises its spectrum:
SVPN(Q) = U S^alpha V^T. A full SVD per sample is slow on GPUs and CPUs alike, so the paper estimates only the
top-k singular triplets by power iteration and rescales the rest by the k-th singular value:

    SVPN_k(Q) = U_k S_k^alpha V_k^T + (Q - U_k S_k V_k^T) / s_k^(1 - alpha)

For k = 1 this collapses to Q / s_1^(1 - alpha): one power iteration (two batched mat-vecs) per sample.
Everything runs in fp32 with autocast off: s_1^(alpha - 1) of a bf16 Q loses the precision the head needs and the
code this recipe descends from reported NaN losses under AMP.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _floored(x: Tensor) -> Tensor:
    """Floor on singular values and norms: a constant Q (all tokens equal) must not divide by zero. The floor is a
    literal because TorchScript cannot read a module-level float."""
    return x.clamp_min(1e-6)


def cross_covariance(x1: Tensor, x2: Tensor) -> Tensor:
    """(B, d1, N), (B, d2, N) token features -> (B, d1, d2) cross-covariance over the N tokens."""
    if x1.shape[0] != x2.shape[0] or x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"cross_covariance needs (B, d1, N) and (B, d2, N) with equal B and N, got "
                         f"{x1.shape} and {x2.shape}")
    n = x1.shape[-1]
    x1 = x1 - x1.mean(dim=-1, keepdim=True)
    x2 = x2 - x2.mean(dim=-1, keepdim=True)
    return x1 @ x2.transpose(-1, -2) / n


def _power_step(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step on each q (B, m, n) from v, (n,) shared or (B, n): returns u (B, m), s (B,), v (B, n).

    Batched matmuls, not einsum: this is the whole cost of the fast path.
    """
    u = torch.matmul(q, v.unsqueeze(-1)).squeeze(-1)
    u = u / _floored(torch.linalg.vector_norm(u, dim=-1, keepdim=True))
    v = torch.matmul(u.unsqueeze(-2), q).squeeze(-2)
    s = _floored(torch.linalg.vector_norm(v, dim=-1))
    return u, s, v / s.unsqueeze(-1)


def _power_iteration(q: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplet of each q after ``iters`` >= 1 steps (the first step outside the loop: TorchScript needs
    the triplet defined on every path)."""
    u, s, v = _power_step(q, v)
    for _ in range(iters - 1):
        u, s, v = _power_step(q, v)
    return u, s, v


def _deflate(q: Tensor, start: Tensor, alpha: float, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Find the top triplet of q and remove it: (q - s u v^T, s^alpha u v^T, s)."""
    u, s, v = _power_iteration(q, start, iters)
    rank1 = u.unsqueeze(-1) * v.unsqueeze(-2)  # (B, m, n)
    return q - s[:, None, None] * rank1, s.pow(alpha)[:, None, None] * rank1, s


def svpn(q: Tensor, alpha: float = 0.5, top_k: int = 1, iters: int = 1, init: Tensor | None = None) -> Tensor:
    """Fast SVPN of a batch of matrices q (B, m, n); returns fp32 (B, m, n). Differentiable.

    ``init`` holds the power-iteration start vectors, shape (n,) or (n, top_k) (the model learns them); by
    default a fixed all-ones start. Deflation removes each found triplet before looking for the next one.
    """
    if q.dim() != 3:
        raise ValueError(f"svpn expects a batch of matrices (B, m, n), got shape {q.shape}")
    if not 1 <= top_k <= min(q.shape[-2:]):
        raise ValueError(f"svpn top_k={top_k} is invalid: expected 1 <= top_k <= min(m, n) = {min(q.shape[-2:])}")
    if iters < 1:
        raise ValueError(f"svpn iters={iters} is invalid: expected >= 1")
    n = q.shape[-1]
    if init is None:
        init = q.new_ones(n, top_k, dtype=torch.float32)
    init = init.reshape(n, -1)
    if init.shape[1] < top_k:
        raise ValueError(f"svpn init has {init.shape[1]} start vectors for top_k={top_k}: pass shape ({n}, {top_k})")
    if torch.jit.is_scripting():  # TorchScript cannot switch autocast off by device: run a scripted model in fp32
        return _svpn_fp32(q.float(), init.float(), alpha, top_k, iters)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _svpn_fp32(q.float(), init.float(), alpha, top_k, iters)


def _svpn_fp32(q: Tensor, init: Tensor, alpha: float, top_k: int, iters: int) -> Tensor:
    starts = (init / _floored(torch.linalg.vector_norm(init, dim=0))).T  # (k', n)
    if top_k == 1:  # U S^a V^T + (Q - U S V^T) / s^(1-a) == Q / s^(1-a): only s_1 is needed
        _, s, _ = _power_iteration(q, starts[0], iters)
        return q * s.pow(alpha - 1.0)[:, None, None]
    residual, kept, s = _deflate(q, starts[0], alpha, iters)
    for i in range(1, top_k):
        residual, term, s = _deflate(residual, starts[i], alpha, iters)
        kept = kept + term
    return kept + residual * s.pow(alpha - 1.0)[:, None, None]


def svpn_svd(q: Tensor, alpha: float = 0.5, top_k: int | None = None) -> Tensor:
    """Exact reference through ``torch.linalg.svd``: full U S^alpha V^T (top_k=None) or the top-k form above."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        u, s, vh = torch.linalg.svd(q.float(), full_matrices=False)
        if top_k is None:
            return u @ (s.clamp_min(0).pow(alpha).unsqueeze(-1) * vh)
        uk, sk, vhk = u[..., :top_k], _floored(s[..., :top_k]), vh[..., :top_k, :]
        low_rank = uk @ (sk.unsqueeze(-1) * vhk)
        kept = uk @ (sk.pow(alpha).unsqueeze(-1) * vhk)
        return kept + (q.float() - low_rank) / sk[..., -1:, None].pow(1.0 - alpha)
