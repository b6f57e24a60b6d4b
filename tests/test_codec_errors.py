"""Every user error raises ValueError (or MissingDependencyError) naming the fix."""

import subprocess
import sys

import numpy as np
import pytest

from squinchcomm import codec
from squinchcomm.errors import MissingDependencyError

X = np.arange(20, dtype=np.float32)
P = codec.encode(X)


@pytest.mark.parametrize("bad, match", [
    ([1.0, 2.0], "NumPy array, CuPy array or torch tensor"),
    (np.arange(8, dtype=np.float64), "dtype float64; supported: float32, float16, bfloat16"),
    (np.arange(8, dtype=np.int32), "dtype int32"),
    (np.arange(16, dtype=np.float32)[::2], "must be contiguous"),
    (np.arange(16, dtype=np.float32).reshape(4, 4).T, "must be contiguous"),
])
def test_encode_rejects_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounding="up"), "use 'nearest' or 'stochastic'"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=2 ** 64), "seed="),
    (dict(seed=1.5), "seed="),
    (dict(offset=-8), "offset="),
    (dict(out=np.empty(17, np.uint8)), "out has 17 elements, expected 18"),
    (dict(out=np.empty(18, np.int8)), "out has dtype int8; supported: uint8"),
    (dict(residual=np.zeros(19, np.float32)), "residual has 19 elements, expected 20"),
    (dict(residual=np.zeros(20, np.float64)), "residual has dtype float64"),
    (dict(backend="fortran"), "use 'numba' or 'oracle'"),
])
def test_encode_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(X, **kwargs)


def test_read_only_out_is_rejected():
    out = np.empty(18, np.uint8)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        codec.encode(X, out=out)


@pytest.mark.parametrize("payload, n, kwargs, match", [
    (P[:-1], 20, {}, r"payload has 17 bytes, but n=20 elements need 6 \* ceil\(n / 8\) = 18"),
    (P, 25, {}, "= 24 bytes"),
    (P.view(np.int8), 20, {}, "payload has dtype int8; supported: uint8"),
    (P, -1, {}, "n=-1 must be a non-negative integer"),
    (P, 20.0, {}, "n=20.0 must be"),
    (P, True, {}, "n=True must be"),
    (P, 20, dict(dtype=np.float64), "cannot decode to float64"),
    (P, 20, dict(out=np.empty(19, np.float32)), "out has 19 elements, expected 20"),
])
def test_decode_rejects_bad_arguments(payload, n, kwargs, match):
    with pytest.raises(ValueError, match=match):
        codec.decode(payload, n, **kwargs)


def test_decode_to_numpy_bfloat16_needs_ml_dtypes():
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"NumPy has no bfloat16.*squinchcomm\[cpu\]"):
            codec.decode(P, 20, dtype="bfloat16")
    else:  # the cpu extra installs it: the float32 values rounded to bfloat16
        got = codec.decode(P, 20, dtype="bfloat16")
        assert got.dtype.name == "bfloat16"
        want = codec.decode(P, 20).astype(ml_dtypes.bfloat16)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("payloads, out, kwargs, match", [
    ([], np.zeros(20, np.float32), {}, "payloads is empty"),
    ([P, P[:-1]], np.zeros(20, np.float32), {}, "payload has 17 bytes"),
    (np.stack([P, P])[:, :-1].copy(), np.zeros(20, np.float32), {},
     r"shape \(2, 17\), expected \(k, 18\)"),
    (P, np.zeros(20, np.float32), {}, r"shape \(18,\), expected \(k, 18\)"),
    ([P], np.zeros(20, np.float64), {}, "out has dtype float64; supported: float32"),
    ([P], np.zeros(21, np.float32), {}, "out has 21 elements, expected 20"),
    ([P], np.zeros(20, np.float32), dict(scale=float("nan")), "scale=nan must be finite"),
])
def test_decode_accumulate_rejects_bad_arguments(payloads, out, kwargs, match):
    with pytest.raises(ValueError, match=match):
        codec.decode_accumulate(payloads, 20, out, **kwargs)


def test_reduce_encode_rejects_bad_arguments():
    with pytest.raises(ValueError, match="use 'nearest' or 'stochastic'"):
        codec.reduce_encode([P], 20, rounding="floor")
    with pytest.raises(ValueError, match="residual has 3 elements"):
        codec.reduce_encode([P], 20, residual=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="scale=inf must be finite"):
        codec.reduce_encode([P], 20, scale=float("inf"))


def test_environment_backend_is_validated(monkeypatch):
    monkeypatch.setenv("SQUINCHCOMM_CODEC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SQUINCHCOMM_CODEC_BACKEND='gpu' is not one of"):
        codec.encode(X)
    monkeypatch.setenv("SQUINCHCOMM_CODEC_BACKEND", "oracle")
    assert np.array_equal(codec.encode(X), P)


def test_missing_numba_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'squinchcomm\[cpu\]'"):
        codec.encode(X, backend="numba")


def test_import_pulls_in_no_optional_dependency():
    code = ("import sys, squinchcomm, squinchcomm.codec, squinchcomm.config; "
            "heavy = [m for m in ('torch', 'cupy', 'mpi4py', 'numba') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


torch = pytest.importorskip("torch")


def test_torch_errors():
    with pytest.raises(ValueError, match=r"must be contiguous.*\.contiguous\(\)"):
        codec.encode(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="dtype float64"):
        codec.encode(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out is a torch array on the host, but the input is a numpy"):
        codec.encode(X, out=torch.empty(18, dtype=torch.uint8))
    with pytest.raises(ValueError, match="device 'meta' are not supported"):
        codec.encode(torch.zeros(8, device="meta"))


@pytest.mark.parametrize("backend", ["numba", "oracle"])
def test_overlapping_buffers_are_refused(backend):
    """The kernels (declared __restrict__) and the host backends do not work
    in place: a written buffer that shares memory with another argument is an
    error, not undefined behaviour; adjacent views of one buffer are fine."""
    n = 64
    mem = np.zeros(4 * n, np.float32)  # one allocation, viewed several ways
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    mem[:n] = x
    with pytest.raises(ValueError, match="residual overlaps x"):
        codec.encode(mem[:n], residual=mem[n // 2: n // 2 + n], backend=backend)
    with pytest.raises(ValueError, match="out overlaps x"):
        codec.encode(mem[:n], out=mem.view(np.uint8)[8: 8 + codec.encoded_nbytes(n)],
                     backend=backend)
    payload_mem = mem.view(np.uint8)[4 * n: 4 * n + codec.encoded_nbytes(n)]
    # Adjacent views of one allocation do not overlap.
    codec.encode(mem[:n], out=payload_mem, residual=mem[2 * n: 3 * n], backend=backend)
    with pytest.raises(ValueError, match="out overlaps payload"):
        codec.decode(payload_mem, n, out=mem[n: 2 * n], backend=backend)
    stack = np.stack([codec.encode(x), codec.encode(-x)])
    with pytest.raises(ValueError, match="out overlaps payloads"):
        codec.reduce_encode(stack, n, out=stack[1], backend=backend)
    acc = np.zeros(stack.size + 4 * n + 16, np.uint8)
    acc[: stack.size] = stack.reshape(-1)
    with pytest.raises(ValueError, match="out overlaps payloads"):
        codec.decode_accumulate(acc[: stack.size].reshape(stack.shape), n,
                                acc[8: 8 + 4 * n].view(np.float32), backend=backend)
    res = np.zeros(n, np.float32)
    with pytest.raises(ValueError, match="residual overlaps payloads"):
        codec.reduce_encode(acc[: stack.size].reshape(stack.shape), n,
                            residual=acc[: 4 * n].view(np.float32), backend=backend)
    codec.reduce_encode(stack, n, residual=res, backend=backend)  # separate buffers work


@pytest.mark.parametrize("dtype", [">f2", ">f4"])
def test_non_native_byte_order_is_refused_with_the_fix(dtype):
    """Big-endian input used to encode to garbage ('>f2') or fail inside Numba
    ('>f4'); it is a ValueError that names the conversion."""
    x = np.linspace(-1, 1, 16).astype(dtype)
    with pytest.raises(ValueError, match=r"byte order .*newbyteorder\('='\)"):
        codec.encode(x)
    fixed = x.astype(x.dtype.newbyteorder("="))
    assert np.abs(codec.decode(codec.encode(fixed), 16) - fixed.astype(np.float32)).max() < 0.08
    with pytest.raises(ValueError, match="byte order"):
        codec.decode(codec.encode(fixed), 16, out=np.zeros(16, ">f4"))


@pytest.mark.parametrize("statement", ["import squinchcomm.torch",
                                       "import squinchcomm.nn.zreg",
                                       "import squinchcomm; squinchcomm.init('torch')"])
def test_missing_torch_names_the_extra(statement):
    """Without torch, the torch parts raise MissingDependencyError naming the
    extra (a bare ModuleNotFoundError before)."""
    code = ("import sys; sys.modules['torch'] = None\n"  # import torch now fails
            f"try:\n    {statement}\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert "MissingDependencyError" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'squinchcomm[torch]'" in proc.stdout
