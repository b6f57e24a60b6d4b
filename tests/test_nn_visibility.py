"""Visibility-mask attention: encodings vs hand-written masks, blockwise vs dense."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squinchcomm.nn import visibility as vis


def rows(*lines):
    """Hand-written (Q, K) mask: one string of 0/1 per query row."""
    return torch.tensor([[c == "1" for c in line] for line in lines])


def rand_qkv(gen, q_len, k_len, d=4, batch=(2,)):
    q = torch.randn(*batch, q_len, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*batch, k_len, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*batch, k_len, d + 1, generator=gen, dtype=torch.float64)
    return q, k, v


# ------------------------------------------------------- encodings vs masks

HAND_MASKS = {
    "causal": (vis.causal(4), None, rows("1000", "1100", "1110", "1111")),
    "documents": (
        vis.documents(torch.tensor([0, 0, 1, 1, 1, -1])),
        None,
        rows("100000", "110000", "001000", "001100", "001110", "000000"),
    ),
    "prefix_lm": (vis.prefix_lm(5, 2), None, rows("11000", "11000", "11100", "11110", "11111")),
    "sliding_window": (
        vis.sliding_window(5, 2),
        None,
        rows("10000", "11000", "01100", "00110", "00011"),
    ),
    "empty_slots": (
        vis.with_empty_slots(*vis.causal(4), torch.tensor([False, True, False, False])),
        None,
        rows("1000", "1000", "1010", "1011"),
    ),
    # Forest: 0 -> {1 -> {2}, 3}, and a second tree 4 -> {5}.
    "tree": (
        vis.tree(torch.tensor([-1, 0, 1, 0, -1, 4])),
        None,
        rows("100000", "110000", "111000", "100100", "000010", "000011"),
    ),
    # Prompt of 2, beam 0 has 1 filled slot of 3, beam 1 has 2.
    "beam_search": (
        vis.beam_search(2, 2, 3, torch.tensor([1, 2])),
        vis.beam_search_positions(2, 3, torch.tensor([1, 2])),
        rows("11100000", "11000110"),
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_MASKS))
def test_dense_mask_matches_hand_written(name):
    (start, limit), qpos, expected = HAND_MASKS[name]
    mask = vis.dense_mask(start, limit, expected.shape[0], qpos)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("name", sorted(HAND_MASKS))
def test_blockwise_matches_dense_for_each_encoding(name):
    (start, limit), qpos, expected = HAND_MASKS[name]
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand_qkv(gen, expected.shape[0], expected.shape[1])
    want = vis.dense_visibility_attention(q, k, v, start, limit, qpos)
    for block in (1, 2, 3, 64):
        got = vis.visibility_attention(q, k, v, start, limit, qpos, block_q=block, block_k=block)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


LONG_ENCODINGS = {
    "causal": lambda: vis.causal(50),
    "documents": lambda: vis.documents(torch.tensor([0] * 7 + [1] * 20 + [2] * 13 + [-1] * 10)),
    "prefix_lm": lambda: vis.prefix_lm(50, 17),
    "sliding_window": lambda: vis.sliding_window(50, 9),
    # Ten trees of five nodes: root -> {a -> {b, c}, d}.
    "tree": lambda: vis.tree(
        torch.tensor([p if p < 0 else p + 5 * t for t in range(10) for p in (-1, 0, 1, 1, 0)])
    ),
    "beam_search": lambda: vis.beam_search(10, 4, 10, torch.tensor([3, 10, 0, 7])),
}


@pytest.mark.parametrize("name", sorted(LONG_ENCODINGS))
def test_blockwise_matches_dense_longer(name):
    start, limit = LONG_ENCODINGS[name]()
    n = start.numel()
    gen = torch.Generator().manual_seed(2)
    q, k, v = rand_qkv(gen, n, n, batch=(2, 3))
    want = vis.dense_visibility_attention(q, k, v, start, limit)
    got = vis.visibility_attention(q, k, v, start, limit, block_q=8, block_k=16)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_per_sequence_masks_broadcast_over_heads():
    """(B, 1, K) masks: each sequence of the batch has its own pattern, shared by heads."""
    pairs = [vis.causal(20), vis.documents(torch.arange(20) // 7)]
    start = torch.stack([p[0] for p in pairs])[:, None]  # (2, 1, 20)
    limit = torch.stack([p[1] for p in pairs])[:, None]
    gen = torch.Generator().manual_seed(8)
    q, k, v = rand_qkv(gen, 20, 20, batch=(2, 3))
    got = vis.visibility_attention(q, k, v, start, limit, block_q=4, block_k=8)
    for b in range(2):
        want = vis.dense_visibility_attention(q[b], k[b], v[b], start[b, 0], limit[b, 0])
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------- dense reference vs formula


def test_dense_reference_is_softmax_over_visible_keys():
    """Row i is softmax over the keys j with start[j] <= i < limit[j], written out."""
    start = torch.tensor([0, 1, 0, 3, 0, 2])
    limit = torch.tensor([6, 4, 0, 6, 2, 3])
    gen = torch.Generator().manual_seed(3)
    q, k, v = rand_qkv(gen, 6, 6, batch=())
    out = vis.dense_visibility_attention(q, k, v, start, limit, scale=0.7)
    for i in range(6):
        keys = [j for j in range(6) if start[j] <= i < limit[j]]
        if not keys:
            assert torch.equal(out[i], torch.zeros(5, dtype=torch.float64))
            continue
        w = torch.softmax(q[i] @ k[keys].T * 0.7, dim=-1)
        torch.testing.assert_close(out[i], w @ v[keys], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------- random masks


@st.composite
def random_case(draw):
    n_k = draw(st.integers(0, 24))
    starts, limits = [], []
    for _ in range(n_k):
        if draw(st.booleans()) and draw(st.booleans()):
            starts.append(0), limits.append(0)  # an empty slot
        else:
            a = draw(st.integers(0, 30))
            starts.append(a)
            limits.append(a + draw(st.integers(0, 30)))
    n_q = draw(st.integers(0, 12))
    qpos = draw(st.one_of(st.none(), st.lists(st.integers(0, 40), min_size=n_q, max_size=n_q)))
    block_q = draw(st.integers(1, 9))
    block_k = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2 ** 16))
    return starts, limits, n_q, qpos, block_q, block_k, seed


@settings(max_examples=60, deadline=None)
@given(random_case())
def test_blockwise_matches_dense_random(case):
    starts, limits, n_q, qpos, block_q, block_k, seed = case
    start = torch.tensor(starts, dtype=torch.int64)
    limit = torch.tensor(limits, dtype=torch.int64)
    qpos = None if qpos is None else torch.tensor(qpos, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand_qkv(gen, n_q, len(starts))
    want = vis.dense_visibility_attention(q, k, v, start, limit, qpos)
    got = vis.visibility_attention(q, k, v, start, limit, qpos, block_q=block_q, block_k=block_k)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Empty rows are exactly zero in both paths.
    empty_rows = ~vis.dense_mask(start, limit, n_q, qpos).any(-1)
    assert torch.equal(got[:, empty_rows], torch.zeros_like(got[:, empty_rows]))
    assert torch.equal(want[:, empty_rows], torch.zeros_like(want[:, empty_rows]))


def test_empty_rows_give_zeros_and_finite_gradients():
    empty = torch.tensor([True, True, False, False, True, False])
    start, limit = vis.with_empty_slots(*vis.causal(6), empty)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_() for t in rand_qkv(gen, 6, 6))
    for fn in (vis.dense_visibility_attention, vis.visibility_attention):
        out = fn(q, k, v, start, limit)
        assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # queries 0, 1 see nothing
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
    # Gradients of both paths agree.
    dense = vis.dense_visibility_attention(q, k, v, start, limit)
    block = vis.visibility_attention(q, k, v, start, limit, block_q=2, block_k=4)
    g_dense = torch.autograd.grad(dense.sum(), (q, k, v))
    g_block = torch.autograd.grad(block.sum(), (q, k, v))
    for a, b in zip(g_block, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", ["causal", "documents", "sliding_window", "tree"])
def test_kv_cache_queries_equal_rows_of_full_attention(name):
    """Inference: a few queries at absolute positions against the whole cache give
    the same rows as attention over the full sequence."""
    start, limit = LONG_ENCODINGS[name]()
    n = start.numel()
    gen = torch.Generator().manual_seed(5)
    q, k, v = rand_qkv(gen, n, n)
    full = vis.dense_visibility_attention(q, k, v, start, limit)
    positions = torch.tensor([49, 3, 20, 21])
    got = vis.visibility_attention(
        q[:, positions], k, v, start, limit, positions, block_q=2, block_k=8
    )
    torch.testing.assert_close(got, full[:, positions], rtol=1e-12, atol=1e-12)


def test_beam_search_decode_step_sees_prompt_and_own_beam():
    prompt, beams, slots = 3, 3, 4
    lengths = torch.tensor([2, 4, 1])
    start, limit = vis.beam_search(prompt, beams, slots, lengths)
    positions = vis.beam_search_positions(prompt, slots, lengths)
    gen = torch.Generator().manual_seed(6)
    q, k, v = rand_qkv(gen, beams, start.numel(), batch=())
    got = vis.visibility_attention(q, k, v, start, limit, positions, block_q=1, block_k=4)
    for b in range(beams):
        # Independent of the encoding: the prompt, then the beam's filled slots.
        keys = list(range(prompt)) + [prompt + b * slots + t for t in range(int(lengths[b]))]
        w = torch.softmax(q[b] @ k[keys].T / 2.0, dim=-1)
        torch.testing.assert_close(got[b], w @ v[keys], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------- tile skipping


def test_causal_tiles_above_diagonal_are_skipped():
    n, block = 64, 8
    start, limit = vis.causal(n)
    tiles = vis.block_visibility(start, limit, torch.arange(n), block, block)
    a, b = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = torch.where(b < a, 2, torch.where(b == a, 1, 0)).to(torch.int8)
    assert torch.equal(tiles, expected)
    assert int((tiles == 0).sum()) == 28  # 8 * 7 / 2 tiles never touched


def test_sliding_window_tiles_outside_band_are_skipped():
    n, block, window = 64, 8, 8
    start, limit = vis.sliding_window(n, window)
    tiles = vis.block_visibility(start, limit, torch.arange(n), block, block)
    a, b = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    band = (b == a) | (b == a - 1)
    assert torch.equal(tiles != 0, band)
    assert int((tiles == 0).sum()) == 64 - 15


def test_cross_document_tiles_are_skipped():
    # Documents aligned to the tiles: only the diagonal tiles are visited.
    start, limit = vis.documents(torch.arange(4).repeat_interleave(8))
    tiles = vis.block_visibility(start, limit, torch.arange(32), 8, 8)
    assert torch.equal(tiles != 0, torch.eye(4, dtype=torch.bool))


def test_attention_never_touches_skipped_tiles():
    """Padding that fills whole key tiles is skipped: NaN values there cannot leak
    into the output, while the dense path (0 * NaN) would be poisoned."""
    doc_ids = torch.tensor([0] * 10 + [1] * 6 + [-1] * 16)
    start, limit = vis.documents(doc_ids)
    gen = torch.Generator().manual_seed(7)
    q, k, v = rand_qkv(gen, 32, 32)
    v[:, 16:] = float("nan")
    got = vis.visibility_attention(q, k, v, start, limit, block_q=8, block_k=8)
    assert torch.isnan(vis.dense_visibility_attention(q, k, v, start, limit)).any()
    want = vis.dense_visibility_attention(q[:, :16], k[:, :16], v[:, :16], start[:16], limit[:16])
    torch.testing.assert_close(got[:, :16], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, 16:], torch.zeros_like(got[:, 16:]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "start, limit, match",
    [
        (torch.tensor([0, 1]), torch.tensor([2, 2, 2]), "same shape"),
        (torch.tensor([-1, 0]), torch.tensor([2, 2]), ">= 0"),
        (torch.tensor([0.0, 1.0]), torch.tensor([2, 2]), "int32 or int64"),
        (torch.tensor([0, 1]), torch.tensor([2.0, 2.0]), "int32 or int64"),
        (torch.tensor([0, 3]), torch.tensor([2, 2]), r"\[0, 0\)"),
        (torch.tensor(0), torch.tensor(1), "key dimension"),
    ],
)
def test_bad_visibility_raises(start, limit, match):
    with pytest.raises(ValueError, match=match):
        vis.dense_mask(start, limit, 2)
    q = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=match):
        vis.visibility_attention(q, q, q, start, limit)


def test_bad_arguments_raise():
    start, limit = vis.causal(4)
    q = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="one entry per key"):
        vis.visibility_attention(q, q[:3], q[:3], start, limit)
    with pytest.raises(ValueError, match=r"query_positions must have shape \(\.\.\., 4\)"):
        vis.visibility_attention(q, q, q, start, limit, torch.arange(3))
    with pytest.raises(ValueError, match="query_positions must be an int32 or int64"):
        vis.visibility_attention(q, q, q, start, limit, torch.arange(4.0))
    with pytest.raises(ValueError, match="contiguous run"):
        vis.documents(torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="pre-order"):
        vis.tree(torch.tensor([-1, 0, 0, 1]))
    with pytest.raises(ValueError, match="window must be >= 1"):
        vis.sliding_window(4, 0)
    with pytest.raises(ValueError, match="prefix_len must be <= n"):
        vis.prefix_lm(4, 5)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, slots_per_beam = 3\]"):
        vis.beam_search(2, 2, 3, torch.tensor([1, 4]))
