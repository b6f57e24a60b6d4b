"""Bit-exactness: the Numba backend against the NumPy oracle, and the public
API across NumPy, torch, float32/float16/bfloat16."""

import numpy as np
import pytest
import zlib

from squinchcomm import codec
from squinchcomm.codec import encoded_nbytes
from conftest import mixed_values

SIZES = [0, 1, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4095, 16384, 16391, 2048 * 8 * 3 + 5]
ROUNDINGS = ["nearest", "stochastic"]


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.view(np.uint8).tobytes() == b.view(np.uint8).tobytes()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_encode_decode_numba_equals_oracle(n, rounding):
    x = mixed_values(_rng(n, rounding), n)
    p_fast = codec.encode(x, rounding=rounding, seed=n + 3, offset=11, backend="numba")
    p_ref = codec.encode(x, rounding=rounding, seed=n + 3, offset=11, backend="oracle")
    _same_bits(p_fast, p_ref)
    assert p_fast.size == encoded_nbytes(n)
    for dtype in ("float32", "float16"):
        _same_bits(codec.decode(p_ref, n, dtype=dtype, backend="numba"),
                   codec.decode(p_ref, n, dtype=dtype, backend="oracle"))


@pytest.mark.parametrize("n", [1, 9, 1000, 16391])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_error_feedback_numba_equals_oracle(n, rounding):
    rng = _rng("ef", n, rounding)
    x = mixed_values(rng, n)
    r_fast = rng.standard_normal(n).astype(np.float32)
    r_ref = r_fast.copy()
    p_fast = codec.encode(x, rounding=rounding, seed=5, residual=r_fast, backend="numba")
    p_ref = codec.encode(x, rounding=rounding, seed=5, residual=r_ref, backend="oracle")
    _same_bits(p_fast, p_ref)
    _same_bits(r_fast, r_ref)


@pytest.mark.parametrize("n", [1, 7, 1000, 16391, 2048 * 8 + 1])
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_reduce_numba_equals_oracle(n, k, rounding):
    rng = _rng("reduce", n, k, rounding)
    payloads = np.stack([codec.encode(mixed_values(rng, n)) for _ in range(k)])
    acc_fast = rng.standard_normal(n).astype(np.float32)
    acc_ref = acc_fast.copy()
    codec.decode_accumulate(payloads, n, acc_fast, scale=1 / k, backend="numba")
    codec.decode_accumulate(payloads, n, acc_ref, scale=1 / k, backend="oracle")
    _same_bits(acc_fast, acc_ref)
    res_fast = rng.standard_normal(n).astype(np.float32)
    res_ref = res_fast.copy()
    for res in (None, (res_fast, res_ref)):
        q_fast = codec.reduce_encode(payloads, n, scale=1 / k, rounding=rounding, seed=9,
                                     offset=4, residual=None if res is None else res[0],
                                     backend="numba")
        q_ref = codec.reduce_encode(payloads, n, scale=1 / k, rounding=rounding, seed=9,
                                    offset=4, residual=None if res is None else res[1],
                                    backend="oracle")
        _same_bits(q_fast, q_ref)
    _same_bits(res_fast, res_ref)


def test_reduce_encode_equals_decode_accumulate_then_encode():
    rng = _rng("fused")
    n = 5000
    payloads = np.stack([codec.encode(rng.standard_normal(n).astype(np.float32)) for _ in range(3)])
    acc = np.zeros(n, np.float32)
    codec.decode_accumulate(payloads, n, acc, scale=0.5)
    _same_bits(codec.reduce_encode(payloads, n, scale=0.5), codec.encode(acc))


def test_list_of_payloads_equals_stack():
    rng = _rng("list")
    n = 777
    ps = [codec.encode(rng.standard_normal(n).astype(np.float32)) for _ in range(3)]
    a, b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    codec.decode_accumulate(ps, n, a)
    codec.decode_accumulate(np.stack(ps), n, b)
    _same_bits(a, b)


def test_float16_input_equals_float32_input():
    with np.errstate(over="ignore"):  # huge values become fp16 inf: a NaN/Inf block
        x16 = mixed_values(_rng("f16"), 4099).astype(np.float16)
    for backend in ("numba", "oracle"):
        _same_bits(codec.encode(x16, backend=backend), codec.encode(x16.astype(np.float32)))


def test_shards_with_offset_draw_the_same_bits_as_the_whole():
    """Encoding block-aligned shards with offset= reproduces the whole tensor's
    stochastic payload: what a sharded collective relies on."""
    x = _rng("shard").standard_normal(8 * 1000 + 3).astype(np.float32)
    whole = codec.encode(x, rounding="stochastic", seed=42)
    cuts = [0, 8 * 123, 8 * 600, x.size]
    parts = [codec.encode(x[a:b], rounding="stochastic", seed=42, offset=a)
             for a, b in zip(cuts, cuts[1:])]
    _same_bits(np.concatenate(parts), whole)


def test_seed_changes_stochastic_bits_only():
    x = _rng("seed").standard_normal(4096).astype(np.float32)
    assert not np.array_equal(codec.encode(x, rounding="stochastic", seed=1),
                              codec.encode(x, rounding="stochastic", seed=2))
    _same_bits(codec.encode(x, seed=1), codec.encode(x, seed=2))  # nearest ignores the seed


def test_out_buffers_are_used_and_returned():
    x = _rng("out").standard_normal(100).astype(np.float32)
    out = np.empty(encoded_nbytes(100), np.uint8)
    assert codec.encode(x, out=out) is out
    y = np.empty((10, 10), np.float32)  # any shape with the right size
    assert codec.decode(out, 100, out=y) is y
    _same_bits(y.reshape(-1), codec.decode(out, 100))


def test_multidimensional_input_is_flattened_in_c_order():
    x = _rng("2d").standard_normal((7, 13)).astype(np.float32)
    _same_bits(codec.encode(x), codec.encode(x.reshape(-1)))


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cpu_tensors_zero_copy(dtype):
    x = torch.from_numpy(mixed_values(_rng("torch", dtype), 3001)).to(getattr(torch, dtype))
    payload = codec.encode(x)
    assert isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8
    ref = codec.encode(x.float().numpy(), backend="oracle")  # fp16/bf16 -> fp32 is exact
    _same_bits(payload.numpy(), ref)
    y = codec.decode(payload, x.numel(), dtype=x.dtype)
    assert y.dtype == x.dtype
    y_ref = codec.decode(payload, x.numel(), dtype=dtype, backend="oracle")
    assert torch.equal(y.view(torch.int16 if dtype != "float32" else torch.int32),
                       y_ref.view(torch.int16 if dtype != "float32" else torch.int32))


def test_bfloat16_decode_matches_torch_rounding():
    """Decoding to bfloat16 rounds the float32 value to nearest even, like torch."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e3
    payload = codec.encode(x)
    f32 = codec.decode(payload, 4096)
    bf = codec.decode(payload, 4096, dtype=torch.bfloat16)
    assert torch.equal(bf.view(torch.int16), f32.to(torch.bfloat16).view(torch.int16))


def test_torch_requires_grad_and_residual():
    x = torch.randn(1000, requires_grad=True)
    res = torch.zeros(1000)
    p = codec.encode(x, residual=res)
    y = codec.decode(p, 1000)
    assert torch.allclose(x.detach(), y + res, rtol=0, atol=1e-6)


def test_decode_accumulate_nan_results_are_canonical():
    """Whatever NaN goes in (payload NaN blocks, NaN or Inf already in out),
    every backend writes 0x7FC00000."""
    n = 32
    p = codec.encode(np.ones(n, np.float32))
    nan_block = p.copy()
    nan_block[6] = 255  # block 1 decodes to NaN
    for backend in ("numba", "oracle"):
        out = np.zeros(n, np.float32)
        out[0] = np.array([0xFFE12345], np.uint32).view(np.float32)[0]  # a NaN with a payload
        out[16] = np.inf
        codec.decode_accumulate([p, nan_block], n, out, scale=-1.0, backend=backend)
        bits = out.view(np.uint32)
        assert bits[0] == 0x7FC00000 and (bits[8:16] == 0x7FC00000).all()
        assert out[16] == np.inf and np.isfinite(out[17:]).all()
