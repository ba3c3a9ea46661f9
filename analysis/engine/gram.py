"""Exact Gram matrices K_ij = <G_i, G_j>_F of per-sample gradients G_i = D_i^T A_i from their factors.

Two exact routes (DESIGN.md cost model, :func:`gram_costs`): "dense" forms chunks of vec(G_i) and multiplies
them; "ghost" never forms G_i: K_ij = sum_ts (D_i D_j^T)_ts (A_i A_j^T)_ts. Both bound their memory by
``chunk_bytes`` and run on the factors' device (CPU or GPU); results come back as CPU float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from analysis.core.config import ConfigError

__all__ = ["DEFAULT_CHUNK_BYTES", "chunks", "dense_gradients", "gram_costs", "gram_matrix"]

#: Memory for one module's dense G_i chunk (dense Gram route) or row blocks (ghost route), in bytes.
DEFAULT_CHUNK_BYTES = 512 * 2**20


def gram_costs(tokens: Sequence[int], d_out: int, d_in: int, chunk_samples: int) -> dict[str, float]:
    """Multiply-adds of the two exact Gram routes (DESIGN.md cost model) for samples with ``tokens`` rows.

    ghost: (sum_i T_i)^2 (d_in + d_out): the products D D^T and A A^T over all rows.
    dense: forming the G_i (T_i d_out d_in each) plus n^2 d_out d_in for the products vec(G) vec(G)^T. With
    chunks of ``chunk_samples`` (memory bound), B chunks, the block loop forms (B + 1) / 2 chunks per chunk.
    Per pair of samples this is T^2 (d_in + d_out) vs about (T (B + 1) / 2n + 1) d_out d_in.
    """
    n = len(tokens)
    rows = float(sum(tokens))
    size = float(d_out) * d_in
    formations = (math.ceil(n / max(1, chunk_samples)) + 1) / 2
    return {"ghost": rows * rows * (d_in + d_out), "dense": formations * rows * size + n * n * size}


def chunks(count: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering range(count)."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def dense_gradients(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(c, d_out * d_in): the rows vec(G_i) = vec(D_i^T A_i) of a chunk of samples.

    One batched product over factors zero-padded to the longest T_i (zero rows add nothing; one bmm is
    about twice as fast as c separate products)."""
    D = torch.nn.utils.rnn.pad_sequence([D for D, _ in pairs], batch_first=True)
    A = torch.nn.utils.rnn.pad_sequence([A for _, A in pairs], batch_first=True)
    return torch.bmm(D.transpose(1, 2), A).reshape(len(pairs), -1)


def _self_gram(F: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """F F^T (c, c) as float64 from rows F (c, P), computing only the lower block triangle of ``parts`` x
    ``parts`` blocks and mirroring it: (parts + 1) / (2 parts) of the multiply-adds of one full product."""
    K = torch.empty(F.shape[0], F.shape[0], dtype=torch.float64, device=F.device)
    cuts = chunks(F.shape[0], max(1, math.ceil(F.shape[0] / parts)))
    for p, rows_p in enumerate(cuts):
        for rows_q in cuts[: p + 1]:
            block = (F[rows_p] @ F[rows_q].T).double()
            K[rows_p, rows_q] = block
            K[rows_q, rows_p] = block.T
    return K


def _ghost_blocks(tokens: Sequence[int], max_rows: int) -> list[slice]:
    """Consecutive samples grouped so that each block has at most ``max_rows`` rows (or one sample)."""
    blocks, start, rows = [], 0, 0
    for i, t in enumerate(tokens):
        if rows and rows + t > max_rows:
            blocks.append(slice(start, i))
            start, rows = i, 0
        rows += t
    blocks.append(slice(start, len(tokens)))
    return blocks


def gram_matrix(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], route: str,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, set_sizes: Sequence[int] = ()
                ) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Exact Gram matrix K (n, n), K_ij = <G_i, G_j>_F of G_i = D_i^T A_i, as float64 numpy.

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)) per sample, torch. route "dense": chunks of vec(G_i) (two
    chunks alive, at most ``chunk_bytes``) multiplied together; "ghost": K_ij = sum_ts (D_i D_j^T)_ts
    (A_i A_j^T)_ts over row blocks (two (rows x rows) products alive, at most ``chunk_bytes``). Products run
    in the factors' dtype (float32 for a float32 model: relative error ~1e-6 of ||G_i|| ||G_j||).
    Also returns the sum of G_i over each group of consecutive samples of sizes ``set_sizes`` (e.g.
    (n_s, n_u)), dense (d_out, d_in): free on the dense route, one matmul per group on the ghost route.
    Runs on the factors' device; K and the sums are returned on the CPU.
    """
    n = len(pairs)
    d_out, d_in = pairs[0][0].shape[1], pairs[0][1].shape[1]
    dtype = pairs[0][0].dtype
    itemsize = pairs[0][0].element_size()
    group_starts = np.concatenate([[0], np.cumsum(set_sizes)]).astype(int)
    device = pairs[0][0].device
    K = torch.zeros(n, n, dtype=torch.float64, device=device)
    sums = [torch.zeros(d_out, d_in, dtype=dtype, device=device) for _ in set_sizes]
    if route == "dense":
        blocks = chunks(n, max(1, int(chunk_bytes // (2 * d_out * d_in * itemsize))))
        for a, block_a in enumerate(blocks):
            left = dense_gradients(pairs[block_a])
            for g in range(len(set_sizes)):  # group sums from the rows of this chunk
                lo, hi = max(group_starts[g], block_a.start), min(group_starts[g + 1], block_a.stop)
                if lo < hi:
                    sums[g] += left[lo - block_a.start:hi - block_a.start].sum(dim=0).view(d_out, d_in)
            K[block_a, block_a] = _self_gram(left)
            for block_b in blocks[:a]:
                block = (left @ dense_gradients(pairs[block_b]).T).double()
                K[block_a, block_b] = block
                K[block_b, block_a] = block.T
    elif route == "ghost":
        tokens = [D.shape[0] for D, _ in pairs]

        def stacked(block: slice):
            """Rows of a block of samples, and the (samples x rows) 0/1 matrix summing rows per sample."""
            D = torch.cat([pairs[i][0] for i in range(block.start, block.stop)])
            A = torch.cat([pairs[i][1] for i in range(block.start, block.stop)])
            owner = torch.repeat_interleave(torch.arange(block.stop - block.start, device=device),
                                            torch.tensor(tokens[block], device=device))
            segments = torch.zeros(block.stop - block.start, D.shape[0], dtype=dtype, device=device)
            segments[owner, torch.arange(D.shape[0], device=device)] = 1
            return D, A, segments

        blocks = _ghost_blocks(tokens, max(1, int(math.sqrt(chunk_bytes / (2 * itemsize)))))
        for a, block_a in enumerate(blocks):
            Da, Aa, Sa = stacked(block_a)
            for block_b in blocks[: a + 1]:
                Db, Ab, Sb = (Da, Aa, Sa) if block_b == block_a else stacked(block_b)
                block = (Sa @ ((Da @ Db.T) * (Aa @ Ab.T)) @ Sb.T).double()
                K[block_a, block_b] = block
                K[block_b, block_a] = block.T
        for g in range(len(set_sizes)):
            group = pairs[group_starts[g]:group_starts[g + 1]]
            sums[g] = torch.cat([D for D, _ in group]).T @ torch.cat([A for _, A in group])
    else:
        raise ConfigError(f"gram route must be 'ghost' or 'dense', got {route!r}")
    K = 0.5 * (K + K.T)
    return K.cpu().numpy(), [total.cpu() for total in sums]


