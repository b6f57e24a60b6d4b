"""Visibility-mask attention: per-key ``[start, limit)`` query ranges, O(N) memory.

A sequence's attention pattern is stored as two integer tensors with one entry
per KEY position ``j``::

    key j is visible to query i   iff   visibility_start[j] <= i < visibility_limit[j]

(half-open). ``i`` is the query's absolute position; during inference the
queries of a step sit at positions ``query_positions`` of the KV cache. The
pair costs 2 N integers instead of the N x N boolean mask, and any pattern in
which each key is seen by one contiguous run of queries fits it. Encodings
(constructors in brackets), for N positions:

- causal [:func:`causal`]: ``start[j] = j``, ``limit[j] = N``;
- packed independent documents [:func:`documents`]: causal inside each
  document, ``start[j] = j``, ``limit[j] = end of j's document``;
- bidirectional prefix of length P + causal suffix [:func:`prefix_lm`]:
  prefix keys ``[0, N)``, suffix keys ``[j, N)``;
- sliding window W, causal [:func:`sliding_window`]: ``[j, min(j + W, N))``,
  so query i sees keys ``i - W < j <= i`` (W keys, itself included);
- padding / empty slots [:func:`with_empty_slots`]: ``[0, 0)``, seen by no
  query (a query row with no visible key returns zeros, not NaN);
- tree-structured documents in depth-first (pre-)order [:func:`tree`]: a
  node's subtree is the contiguous run ``[j, end_of_subtree(j))``, so
  ``[j, end_of_subtree(j))`` makes every node see itself and its ancestors
  (ancestors are visible to descendants, siblings are not);
- beam search in a paged KV cache [:func:`beam_search`]: slots
  ``[0, P)`` hold the shared prompt, beam b owns the page
  ``[P + b S, P + (b + 1) S)`` of which the first ``lengths[b]`` slots are
  filled. Prompt keys ``[j, P + n_beams S)`` (seen by the prompt causally and
  by every beam), filled beam keys ``[j, end of the beam's page)`` (causal
  inside the beam, invisible to the other beams), unused slots ``[0, 0)``.
  Beam b's newest token queries at :func:`beam_search_positions`. Reordering
  beams copies (or re-points) pages; the encoding of a page does not change.

Attention comes in two paths that give the same result:

- :func:`dense_visibility_attention`: the reference, materializes
  :func:`dense_mask` (Q x K booleans);
- :func:`visibility_attention`: blockwise (flash-style online softmax) in plain
  torch over query/key tiles. Per tile it needs only the tile's
  ``min/max`` of start/limit (:func:`block_visibility`), skips tiles where no
  key is visible to any query, builds the O(tile^2) mask of partial tiles
  only, and never materializes the Q x K mask or scores.

Shapes: ``start``/``limit`` are ``(..., K)``; their leading dimensions
broadcast against the attention's leading dimensions (use ``(B, 1, K)`` for
per-sequence masks shared by the heads of ``q: (B, H, Q, D)``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "causal",
    "documents",
    "prefix_lm",
    "sliding_window",
    "with_empty_slots",
    "tree",
    "beam_search",
    "beam_search_positions",
    "dense_mask",
    "block_visibility",
    "dense_visibility_attention",
    "visibility_attention",
]

_INT_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------- validation


def _check_visibility(start: torch.Tensor, limit: torch.Tensor) -> None:
    """Raise ValueError unless start/limit are a valid visibility pair."""
    for name, t in (("visibility_start", start), ("visibility_limit", limit)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {got}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a key dimension (shape (..., K)), got a scalar")
    if start.shape != limit.shape:
        raise ValueError(
            f"visibility_start and visibility_limit must have the same shape, "
            f"got {tuple(start.shape)} and {tuple(limit.shape)}"
        )
    if start.numel() and int(start.min()) < 0:
        raise ValueError("visibility_start must be >= 0 (use [0, 0) for an empty slot)")
    if bool((limit < start).any()):
        raise ValueError(
            "visibility_limit must be >= visibility_start (use [0, 0) for an empty slot)"
        )


def _query_positions(query_positions, n_queries: int, device) -> torch.Tensor:
    """Default to 0..n_queries-1; validate explicit positions."""
    if query_positions is None:
        return torch.arange(n_queries, device=device)
    qp = query_positions
    if not isinstance(qp, torch.Tensor) or qp.dtype not in _INT_DTYPES:
        got = qp.dtype if isinstance(qp, torch.Tensor) else type(qp).__name__
        raise ValueError(f"query_positions must be an int32 or int64 tensor, got {got}")
    if qp.dim() == 0 or qp.shape[-1] != n_queries:
        raise ValueError(
            f"query_positions must have shape (..., {n_queries}) (one per query), "
            f"got {tuple(qp.shape)}"
        )
    if qp.numel() and int(qp.min()) < 0:
        raise ValueError("query_positions must be >= 0")
    return qp


def _nonneg_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


# -------------------------------------------------------------- constructors


def causal(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of causal attention over ``n`` positions: ``[j, n)``."""
    n = _nonneg_int("n", n)
    start = torch.arange(n, dtype=torch.int64)
    return start, torch.full((n,), n, dtype=torch.int64)


def documents(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of packed independent documents, causal in each.

    Args:
        doc_ids: (N,) integer document id per position; each document is one
            contiguous run. Negative ids mark padding, encoded as ``[0, 0)``.

    Example: ``documents(torch.tensor([0, 0, 1, 1, 1]))`` gives
    ``start = [0, 1, 2, 3, 4]``, ``limit = [2, 2, 5, 5, 5]``.
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 1 or doc_ids.is_floating_point():
        raise ValueError("doc_ids must be a 1-D integer tensor (one document id per position)")
    doc_ids = doc_ids.to(torch.int64)
    n = doc_ids.numel()
    # Step 1: runs of equal ids; a run boundary is where the id changes.
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = doc_ids[1:] != doc_ids[:-1]
    run_first = torch.nonzero(new_run).flatten()
    run_ids = doc_ids[run_first]
    real = run_ids[run_ids >= 0]
    if real.numel() != torch.unique(real).numel():
        raise ValueError(
            "each document must be one contiguous run of doc_ids (an id reappears after "
            "another document); renumber the pieces as separate documents"
        )
    # Step 2: every position's limit is the end of its run.
    run_end = torch.empty_like(run_first)
    run_end[:-1] = run_first[1:]
    run_end[-1:] = n
    run_index = torch.cumsum(new_run.to(torch.int64), 0) - 1
    start = torch.arange(n, dtype=torch.int64)
    limit = run_end[run_index] if n else start.clone()
    return with_empty_slots(start, limit, doc_ids < 0)


def prefix_lm(n: int, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of a bidirectional prefix of ``prefix_len`` + causal suffix.

    Prefix keys are seen by every query (``[0, n)``), suffix keys causally (``[j, n)``).
    """
    n = _nonneg_int("n", n)
    prefix_len = _nonneg_int("prefix_len", prefix_len)
    if prefix_len > n:
        raise ValueError(f"prefix_len must be <= n = {n}, got {prefix_len}")
    start, limit = causal(n)
    start[:prefix_len] = 0
    return start, limit


def sliding_window(n: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of causal sliding-window attention: query i sees the
    ``window`` keys ``i - window < j <= i`` (``[j, min(j + window, n))``)."""
    n = _nonneg_int("n", n)
    window = _nonneg_int("window", window)
    if window < 1:
        raise ValueError("window must be >= 1 (a query always sees itself)")
    start = torch.arange(n, dtype=torch.int64)
    return start, torch.clamp(start + window, max=n)


def with_empty_slots(
    start: torch.Tensor, limit: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return copies of (start, limit) with the keys where ``empty`` is True set
    to ``[0, 0)`` (padding, unused cache slots): no query sees them."""
    _check_visibility(start, limit)
    if not isinstance(empty, torch.Tensor) or empty.dtype != torch.bool or (
        empty.shape != start.shape
    ):
        raise ValueError(f"empty must be a bool tensor of shape {tuple(start.shape)}")
    zero = torch.zeros((), dtype=start.dtype)
    return torch.where(empty, zero, start), torch.where(empty, zero, limit)


def tree(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of tree-structured documents stored in depth-first order.

    Each node sees itself and its ancestors: key j is visible to queries in
    ``[j, end_of_subtree(j))``, the contiguous run its subtree occupies in
    pre-order. Siblings and cousins do not see each other.

    Args:
        parents: (N,) integer parent index per node, ``-1`` for a root (several
            roots make a forest). Nodes must be in depth-first pre-order: every
            node's parent is on the path from a root to the previous node.

    Example: ``tree(torch.tensor([-1, 0, 1, 0]))`` (root 0, child 1 with
    child 2, child 3) gives ``start = [0, 1, 2, 3]``, ``limit = [4, 3, 3, 4]``.
    """
    if not isinstance(parents, torch.Tensor) or parents.dim() != 1 or parents.is_floating_point():
        raise ValueError(
            "parents must be a 1-D integer tensor (parent index per node, -1 for roots)"
        )
    parent = parents.tolist()
    n = len(parent)
    end = [n] * n
    # Step 1: walk the pre-order keeping the root-to-node path; a node's subtree
    # ends where the walk leaves it (pops it off the path).
    path: list[int] = []
    for j, p in enumerate(parent):
        if p != -1 and p not in path:
            raise ValueError(
                f"parents is not in depth-first pre-order: node {j} has parent {p}, which is "
                f"not on the current root-to-node path {path} (parents must come before "
                f"children and each subtree must be contiguous)"
            )
        while path and path[-1] != p:
            end[path.pop()] = j
        path.append(j)
    start = torch.arange(n, dtype=torch.int64)
    return start, torch.tensor(end, dtype=torch.int64)


def beam_search(
    prefix_len: int, n_beams: int, slots_per_beam: int, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (start, limit) of beam search over a paged KV cache with empty slots.

    Layout (``P = prefix_len``, ``S = slots_per_beam``, ``N = P + n_beams * S``):
    slots ``[0, P)`` hold the shared prompt; beam b owns the page
    ``[P + b S, P + (b + 1) S)``, of which the first ``lengths[b]`` slots are
    filled. Prompt keys: ``[j, N)``; filled beam keys: ``[j, end of page)``;
    unused slots: ``[0, 0)``. Beam b's newest token queries at
    ``beam_search_positions(P, S, lengths)[b]``.
    """
    prefix_len = _nonneg_int("prefix_len", prefix_len)
    n_beams = _nonneg_int("n_beams", n_beams)
    slots_per_beam = _nonneg_int("slots_per_beam", slots_per_beam)
    lengths = _beam_lengths(lengths, n_beams, slots_per_beam)
    n = prefix_len + n_beams * slots_per_beam
    start = torch.arange(n, dtype=torch.int64)
    limit = torch.full((n,), n, dtype=torch.int64)
    # (n_beams, S) views of the beams' pages.
    slot = torch.arange(slots_per_beam)
    page_end = prefix_len + (torch.arange(n_beams) + 1) * slots_per_beam  # (n_beams,)
    limit[prefix_len:] = page_end.repeat_interleave(slots_per_beam)
    empty = torch.zeros(n, dtype=torch.bool)
    empty[prefix_len:] = (slot[None, :] >= lengths[:, None]).flatten()
    return with_empty_slots(start, limit, empty)


def beam_search_positions(
    prefix_len: int, slots_per_beam: int, lengths: torch.Tensor
) -> torch.Tensor:
    """Return (n_beams,) query positions of each beam's newest token (its last
    filled slot) in the :func:`beam_search` layout. ``lengths`` counts that token."""
    prefix_len = _nonneg_int("prefix_len", prefix_len)
    slots_per_beam = _nonneg_int("slots_per_beam", slots_per_beam)
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError("lengths must be a 1-D integer tensor (filled slots per beam)")
    lengths = _beam_lengths(lengths, lengths.numel(), slots_per_beam)
    if bool((lengths < 1).any()):
        raise ValueError(
            "every beam needs lengths >= 1 (its newest token) to have a query position"
        )
    return prefix_len + torch.arange(lengths.numel()) * slots_per_beam + lengths - 1


def _beam_lengths(lengths, n_beams: int, slots_per_beam: int) -> torch.Tensor:
    if (
        not isinstance(lengths, torch.Tensor)
        or lengths.is_floating_point()
        or lengths.shape != (n_beams,)
    ):
        raise ValueError(f"lengths must be an integer tensor of shape ({n_beams},)")
    if bool(((lengths < 0) | (lengths > slots_per_beam)).any()):
        raise ValueError(f"lengths must lie in [0, slots_per_beam = {slots_per_beam}]")
    return lengths.to(torch.int64)


# ----------------------------------------------------------------- the masks


def dense_mask(
    start: torch.Tensor,
    limit: torch.Tensor,
    n_queries: int,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the boolean (..., Q, K) mask, True where key j is visible to query i.

    The reference the blockwise path is tested against; costs Q x K booleans.

    Args:
        start, limit: (..., K) visibility pair.
        n_queries: Q.
        query_positions: (..., Q) absolute query positions; default ``0..Q-1``.
    """
    _check_visibility(start, limit)
    n_queries = _nonneg_int("n_queries", n_queries)
    qp = _query_positions(query_positions, n_queries, start.device)
    qp = qp[..., :, None]  # (..., Q, 1)
    return (start[..., None, :] <= qp) & (qp < limit[..., None, :])  # (..., Q, K)


def block_visibility(
    start: torch.Tensor,
    limit: torch.Tensor,
    query_positions: torch.Tensor,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Return the (n_q_blocks, n_k_blocks) tile map: 0 skip, 1 partial, 2 full.

    Uses only per-tile minima/maxima (O(N / tile) each, the map is
    O((N / tile)^2)), over every leading (batch/head) dimension:

    - skip (0) when no non-empty key of the key tile can be seen by a query of
      the query tile: all keys empty, or ``min start > max query`` or
      ``max limit <= min query``;
    - full (2) when every key is seen by every query: no empty key,
      ``max start <= min query`` and ``min limit > max query``;
    - partial (1) otherwise: the tile needs its O(tile^2) mask.

    Causal tiles above the diagonal, sliding-window tiles outside the band and
    cross-document tiles are skipped. :func:`visibility_attention` visits
    exactly the non-zero tiles.
    """
    _check_visibility(start, limit)
    block_q = _nonneg_int("block_q", block_q)
    block_k = _nonneg_int("block_k", block_k)
    if block_q < 1 or block_k < 1:
        raise ValueError("block_q and block_k must be >= 1")
    n_q, n_k = query_positions.shape[-1], start.shape[-1]
    if n_q == 0 or n_k == 0:
        return torch.zeros((-(-n_q // block_q), -(-n_k // block_k)), dtype=torch.int8)
    qp = query_positions.reshape(-1, n_q)  # (Bq, Q)
    s = start.reshape(-1, n_k)  # (Bk, K)
    lim = limit.reshape(-1, n_k)
    # Step 1: per query tile, the smallest and largest query position.
    q_lo, q_hi = [], []
    for q0 in range(0, qp.shape[-1], block_q):
        tile = qp[:, q0:q0 + block_q]
        q_lo.append(tile.min())
        q_hi.append(tile.max())
    q_lo = torch.stack(q_lo)[:, None]  # (nQ, 1)
    q_hi = torch.stack(q_hi)[:, None]
    # Step 2: per key tile, extremes over the non-empty keys (empty keys are
    # seen by nobody and must not widen the range) and over all keys.
    big = torch.iinfo(torch.int64).max
    nonempty = s < lim
    k_min_start, k_max_limit, k_max_start, k_min_limit, k_any_empty = [], [], [], [], []
    for k0 in range(0, n_k, block_k):
        ts, tl, tn = s[:, k0:k0 + block_k], lim[:, k0:k0 + block_k], nonempty[:, k0:k0 + block_k]
        k_min_start.append(torch.where(tn, ts, big).min())
        k_max_limit.append(torch.where(tn, tl, -1).max())
        k_max_start.append(ts.max())
        k_min_limit.append(tl.min())
        k_any_empty.append(~tn.all())
    k_min_start = torch.stack(k_min_start)[None, :]  # (1, nK)
    k_max_limit = torch.stack(k_max_limit)[None, :]
    k_max_start = torch.stack(k_max_start)[None, :]
    k_min_limit = torch.stack(k_min_limit)[None, :]
    k_any_empty = torch.stack(k_any_empty)[None, :]
    # Step 3: classify every (query tile, key tile) pair.
    skip = (k_min_start > q_hi) | (k_max_limit <= q_lo)  # (nQ, nK)
    full = ~k_any_empty & (k_max_start <= q_lo) & (k_min_limit > q_hi)
    tiles = torch.ones(skip.shape, dtype=torch.int8)
    tiles[full] = 2
    tiles[skip] = 0
    return tiles


# ------------------------------------------------------------- the attention


def _check_qkv(q, k, v, start) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of shape (..., length, head_dim)")
    if k.shape[-2] != v.shape[-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k and v must have shapes (..., K, {q.shape[-1]}) and (..., K, Dv) with the same K, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if start.shape[-1] != k.shape[-2]:
        raise ValueError(
            f"visibility_start/limit need one entry per key: last dimension {k.shape[-2]}, "
            f"got {start.shape[-1]}"
        )


def dense_visibility_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    limit: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Return softmax(q k^T * scale, masked) v with the dense (Q, K) mask (reference).

    Args:
        q: (..., Q, D); k: (..., K, D); v: (..., K, Dv).
        start, limit: (..., K), broadcasting against the leading dimensions.
        query_positions: (..., Q) absolute positions; default ``0..Q-1``.
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        (..., Q, Dv); rows with no visible key are zeros.
    """
    _check_visibility(start, limit)
    _check_qkv(q, k, v, start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = dense_mask(start, limit, q.shape[-2], query_positions)  # (..., Q, K)
    scores = (q @ k.transpose(-1, -2)) * scale  # (..., Q, K)
    scores = scores.masked_fill(~mask, float("-inf"))
    # Shift by the row maximum; an all-masked (or key-less) row shifts by 0 so
    # exp gives 0, not NaN.
    finite = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    row_max = finite.amax(-1, keepdim=True) if scores.shape[-1] else 0.0
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    out = p @ v
    safe = denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, out / safe, torch.zeros_like(out))


def visibility_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    limit: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """Return masked attention computed tile by tile, skipping invisible tiles.

    Flash-style online softmax in plain torch: for each query tile, walk the
    key tiles that :func:`block_visibility` does not skip, keeping a running
    row maximum ``m``, normalizer ``l`` and output accumulator. Only partial
    tiles build a (block_q, block_k) mask from start/limit; the Q x K mask and
    scores are never materialized. Differentiable (autograd through the tiles).

    Args:
        q: (..., Q, D); k: (..., K, D); v: (..., K, Dv). For inference, ``k, v``
            are the KV cache and ``q`` the step's queries.
        start, limit: (..., K), broadcasting against the leading dimensions.
        query_positions: (..., Q) absolute positions of the queries (in the KV
            cache's coordinates); default ``0..Q-1``.
        scale: logit scale, default ``1 / sqrt(D)``.
        block_q, block_k: tile sizes.

    Returns:
        (..., Q, Dv), equal to :func:`dense_visibility_attention` up to rounding;
        rows with no visible key are zeros.

    Example::

        start, limit = sliding_window(n, 256)
        out = visibility_attention(q, k, v, start, limit)
    """
    _check_visibility(start, limit)
    _check_qkv(q, k, v, start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_q = q.shape[-2]
    qp = _query_positions(query_positions, n_q, q.device)
    tiles = block_visibility(start, limit, qp, block_q, block_k)  # (nQ, nK)
    batch = torch.broadcast_shapes(
        q.shape[:-2], k.shape[:-2], v.shape[:-2], start.shape[:-1], qp.shape[:-1]
    )
    out_tiles = []
    for qi in range(tiles.shape[0]):
        q0 = qi * block_q
        q_t = q[..., q0:q0 + block_q, :]  # (..., tq, D)
        p_t = qp[..., q0:q0 + block_q, None]  # (..., tq, 1)
        tq = q_t.shape[-2]
        # Step 1: running state of the online softmax for this query tile.
        m = torch.full((*batch, tq, 1), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros((*batch, tq, 1), dtype=q.dtype, device=q.device)
        acc = torch.zeros((*batch, tq, v.shape[-1]), dtype=q.dtype, device=q.device)
        for ki in torch.nonzero(tiles[qi]).flatten().tolist():
            k0 = ki * block_k
            # Step 2: scores of the tile; mask them only if the tile is partial.
            s = (q_t @ k[..., k0:k0 + block_k, :].transpose(-1, -2)) * scale  # (..., tq, tk)
            if tiles[qi, ki] == 1:
                s_k = start[..., None, k0:k0 + block_k]  # (..., 1, tk)
                l_k = limit[..., None, k0:k0 + block_k]
                vis = (s_k <= p_t) & (p_t < l_k)  # (..., tq, tk)
                s = s.masked_fill(~vis, float("-inf"))
            # Step 3: rescale the running state to the new row maximum. Rows
            # that have seen no visible key yet keep max -inf: shift by 0.
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            alpha = torch.exp(m - shift)
            p = torch.exp(s - shift)
            l = l * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + p @ v[..., k0:k0 + block_k, :]
            m = m_new
        # Step 4: normalize; rows with no visible key (l == 0) are zeros.
        safe = l.clamp_min(torch.finfo(l.dtype).tiny)
        out_tiles.append(torch.where(l > 0, acc / safe, torch.zeros_like(acc)))
    if not out_tiles:
        return torch.zeros((*batch, 0, v.shape[-1]), dtype=q.dtype, device=q.device)
    return torch.cat(out_tiles, dim=-2)
