"""The CUDA kernels, run on the CPU and compared with the oracle bit for bit.

tests/native/host_check.cu includes native/squinch.cu itself, the
``__global__`` functions and the ``__host__ __device__`` code of squinch.cuh,
and runs the kernels under tests/native/cuda_host.h's emulated launch (blocks
in turn, a block's threads as real threads with ``__syncthreads`` a barrier,
shared memory scribbled between blocks). Built with the host C++ compiler (no
CUDA toolkit, no GPU), it checks the kernels' grid-stride loops, alignment
paths, table staging, arithmetic, packing and conversions against
:mod:`squinchcomm.codec.oracle` on misaligned and odd-sized buffers, under the
launch geometry codec/cuda.py computes and under deliberately small grids.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from squinchcomm.codec import cuda as cuda_backend
from squinchcomm.codec import format as fmt
from squinchcomm.codec import oracle
from squinch_data import (assert_bits_equal, bf16_reference, every_level_payload,
                          f16_reference, from_kind, random_payloads, random_values,
                          scribble_tail, stochastic_tie_values, to_kind)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/Inf inputs
ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
DRIVER = ROOT / "tests" / "native" / "host_check.cu"
KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}
SIZES = [0, 1, 7, 8, 9, 1000, 4099]
OFFSETS = [0, 12345, 2**32 - 5, 2**64 - 20]  # crossing the 32-bit and 64-bit wraps
# Each packed-table offset of native/squinch.cuh and the format.py table it indexes
# (names only: the numbers come from the header and from format.packed_tables()).
# Launches (grid, threads per CTA). None: what codec/cuda.py launches
# (cuda._grid with 256 threads), with the grid capped at 3 CTAs as on a tiny GPU,
# so large inputs take the grid-stride loop.
LAUNCH_CAP = 3
LAUNCHES = {"serial": (1, 1), "strided": (3, 32), "cuda": None}
TABLE_OFFSETS = {"kTabScale": "SCALE", "kTabInv": "INV_SCALE", "kTabT": "THRESHOLD",
                 "kTabF": "LEVEL_FRACTION", "kTabMid": "MIDPOINT", "kTabStep": "LEVEL_STEP"}


# ---------------------------------------------------------------- the driver
class HostCheck:
    """Run tests/native/host_check on arrays through files in a scratch folder."""

    def __init__(self, exe: Path, folder: Path):
        self.exe, self.folder = exe, folder
        self.launch = None  # (grid, threads), or None: codec/cuda.py's geometry
        self.tables = folder / "tables.bin"
        fmt.packed_tables().tofile(self.tables)
        self._count = itertools.count()

    def _dir(self) -> Path:
        d = self.folder / f"call{next(self._count)}"
        d.mkdir()
        return d

    def _geometry(self, n: int) -> tuple[int, int]:
        if self.launch is not None:
            return self.launch
        return cuda_backend._grid(fmt.num_blocks(n), LAUNCH_CAP), cuda_backend._THREADS

    def _run(self, *args) -> str:
        proc = subprocess.run([str(self.exe), *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def layout(self) -> dict[str, int]:
        """The kTab* offsets as compiled from native/squinch.cuh."""
        return {name: int(value) for name, value in
                (line.split() for line in self._run("layout").splitlines())}

    def encode(self, x, kind, stochastic, seed, offset, residual, shift):
        d = self._dir()
        x.tofile(d / "x")
        res_in = "-"
        if residual is not None:
            residual.tofile(d / "res")
            res_in = d / "res"
        self._run("encode", self.tables, KINDS[kind], x.size, d / "x", int(stochastic),
                  fmt.stream_key(seed), offset, res_in, d / "out", d / "res_out", shift,
                  *self._geometry(x.size))
        res = None if residual is None else np.fromfile(d / "res_out", np.float32)
        return np.fromfile(d / "out", np.uint8), res

    def decode(self, payload, n, kind, shift):
        d = self._dir()
        payload.tofile(d / "p")
        self._run("decode", self.tables, KINDS[kind], n, d / "p", d / "out", shift,
                  *self._geometry(n))
        return np.fromfile(d / "out", np.float32 if kind == "float32" else np.uint16)

    def accumulate(self, payloads, n, out, scale, shift):
        d = self._dir()
        payloads.tofile(d / "p")
        out.tofile(d / "o")
        scale_bits = int(np.float32(scale).view(np.uint32))
        self._run("accumulate", self.tables, payloads.shape[0], n, d / "p", d / "o",
                  scale_bits, d / "out", shift, *self._geometry(n))
        return np.fromfile(d / "out", np.float32)

    def reduce(self, payloads, n, scale, stochastic, seed, offset, residual, shift):
        d = self._dir()
        payloads.tofile(d / "p")
        res_in = "-"
        if residual is not None:
            residual.tofile(d / "res")
            res_in = d / "res"
        scale_bits = int(np.float32(scale).view(np.uint32))
        self._run("reduce", self.tables, payloads.shape[0], n, d / "p", scale_bits,
                  int(stochastic), fmt.stream_key(seed), offset, res_in, d / "out",
                  d / "res_out", shift, *self._geometry(n))
        res = None if residual is None else np.fromfile(d / "res_out", np.float32)
        return np.fromfile(d / "out", np.uint8), res

    def paths(self) -> dict[tuple[int, str], tuple[bool, bool]]:
        """{(byte shift, kernel): (vec, even)} from the header's *_paths."""
        out = {}
        for line in self._run("paths").splitlines():
            shift, *rest = line.split()
            for i in range(0, len(rest), 3):
                out[int(shift), rest[i]] = (rest[i + 1] == "1", rest[i + 2] == "1")
        return out

    def convert(self, f32, u16):
        d = self._dir()
        f32.tofile(d / "f")
        u16.tofile(d / "h")
        self._run("convert", d / "f", d / "h", d / "a", d / "b", d / "c", d / "e")
        return (np.fromfile(d / "a", np.uint16), np.fromfile(d / "b", np.uint16),
                np.fromfile(d / "c", np.float32), np.fromfile(d / "e", np.float32))


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build_host_check(folder: Path, extra=()) -> Path:
    """Compile tests/native/host_check.cu (which includes native/squinch.cu) for
    the CPU with warnings as errors and strict aliasing on (the kernels copy
    bytes on the host instead of type punning), no FMA contraction (the host
    path relies on plain IEEE float32 operations)."""
    exe = folder / "host_check"
    cmd = [_compiler(), "-std=c++17", "-O2", "-pthread", "-ffp-contract=off",
           "-fstrict-aliasing", "-Wall", "-Wextra", "-Werror", *extra,
           "-I", str(NATIVE), "-I", str(DRIVER.parent), "-x", "c++", str(DRIVER),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return exe


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> HostCheck:
    if _compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    folder = tmp_path_factory.mktemp("host_check")
    check = HostCheck(build_host_check(folder), folder)
    yield check
    check.launch = None


@pytest.fixture(params=list(LAUNCHES), ids=list(LAUNCHES))
def launch(request, host):
    """Run the test under each launch geometry."""
    host.launch = LAUNCHES[request.param]
    yield host
    host.launch = None


# ---------------------------------------------------------------- tests
def test_native_sources_are_nvrtc_friendly():
    """NVRTC has no standard headers: the kernel sources include only squinch.cuh."""
    for name in ("squinch.cu", "squinch.cuh"):
        includes = re.findall(r'^\s*#\s*include\s*(\S+)', (NATIVE / name).read_text(), re.M)
        assert all(inc == '"squinch.cuh"' for inc in includes), (name, includes)


def check_table_layout(offsets: dict[str, int]):
    """The header's offsets index format.packed_tables() as the kernels assume:
    each kTab* offset starts a bit-exact copy of its format.py table, the tables
    tile the packed array without gaps or overlaps, and kTabSize is its length."""
    packed = fmt.packed_tables()
    assert set(offsets) == set(TABLE_OFFSETS) | {"kTabSize"}, sorted(offsets)
    assert offsets["kTabSize"] == packed.size
    covered = np.zeros(packed.size, np.int64)
    for name, table in TABLE_OFFSETS.items():
        want = getattr(fmt, table)
        lo = offsets[name]
        assert 0 <= lo <= packed.size - want.size, (name, lo, want.size)
        assert_bits_equal(packed[lo: lo + want.size], want, f"{name} -> format.{table}")
        covered[lo: lo + want.size] += 1
    assert np.all(covered == 1), "the tables do not tile format.packed_tables()"


def test_packed_table_layout_matches_header_text():
    """Without a compiler: the offsets as written in native/squinch.cuh."""
    text = (NATIVE / "squinch.cuh").read_text()
    check_table_layout({k: int(v) for k, v in re.findall(r"\b(kTab\w+) = (\d+)", text)})


def test_packed_table_layout_matches_compiled_header(host):
    """The offsets the compiler resolves from native/squinch.cuh (host_check layout)."""
    check_table_layout(host.layout())


def test_launch_paths_follow_pointer_alignment(host):
    """The kernels' path flags (squinch::*_paths, the one function kernels and
    this driver share): 16-byte vector accesses only when every float/uint16
    array is 16-byte aligned, 2-byte payload accesses only when every payload
    pointer and the row stride are even; a null residual constrains nothing."""
    got = host.paths()
    for shift in (0, 1, 2):
        vec, even = shift == 0, shift % 2 == 0
        assert got[shift, "encode"] == (vec, even)
        assert got[shift, "encode_nores"] == (vec, even)
        assert got[shift, "decode"] == (vec, even)
        assert got[shift, "accumulate"] == (vec, even)
        assert got[shift, "accumulate_odd"] == (vec, False)  # stride 3: rows alternate parity
        assert got[shift, "reduce"] == (vec, even)
        assert got[shift, "reduce_nores"] == (True, even)  # no float array at all


# n with more 8-element blocks than the strided launch's 96 threads and than
# the capped cuda launch's 3 x 256, so both run their grid-stride loops.
STRIDE_N = 8 * 800 + 5


@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_every_kernel_under_every_launch(launch, shift):
    """Each kernel under a serial, a small strided and the backend's own launch
    geometry: the grid-stride loop covers every block exactly once, whatever
    the grid, and each CTA stages the tables before any thread reads them."""
    host, n = launch, STRIDE_N
    rng = np.random.default_rng([shift, 77])
    x = random_values(rng, n, True)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    got, got_res = host.encode(x, "float32", True, 9, 2**32 - 3, residual.copy(), shift)
    want_res = residual.copy()
    assert_bits_equal(got, oracle.encode(x, "stochastic", 9, 2**32 - 3, want_res), "encode")
    assert_bits_equal(got_res, want_res, "encode residual")

    bits = to_kind(x, "bfloat16")
    got, _ = host.encode(bits, "bfloat16", False, 0, 0, None, shift)
    assert_bits_equal(got, oracle.encode(from_kind(bits, "bfloat16")), "encode bf16")

    payloads = scribble_tail(random_payloads(rng, 3, n), n, rng)
    ref = oracle.decode(payloads[0], n)
    assert_bits_equal(host.decode(payloads[0], n, "float16", shift), f16_reference(ref),
                      "decode f16")
    out = random_values(rng, n, specials=False)
    assert_bits_equal(host.accumulate(payloads, n, out.copy(), 1 / 3, shift),
                      oracle.decode_accumulate(payloads, n, out.copy(), 1 / 3), "accumulate")
    got, got_res = host.reduce(payloads, n, 0.5, True, 4, 8, residual.copy(), shift)
    want_res = residual.copy()
    assert_bits_equal(got, oracle.reduce_encode(payloads, n, 0.5, "stochastic", 4, 8, want_res),
                      "reduce_encode")
    assert_bits_equal(got_res, want_res, "reduce_encode residual")


def test_launch_grid_matches_the_backend():
    """codec/cuda.py's grid: one thread per block, capped, never zero."""
    t = cuda_backend._THREADS
    assert cuda_backend._grid(1, 100) == 1
    assert cuda_backend._grid(t, 100) == 1
    assert cuda_backend._grid(t + 1, 100) == 2
    assert cuda_backend._grid(10**9, 100) == 100


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_encode_float32(host, n, stochastic, with_residual, shift):
    rng = np.random.default_rng([n, int(stochastic), int(with_residual), shift])
    x = random_values(rng, n, stochastic)
    residual = None
    if with_residual:
        residual = (random_values(rng, n, specials=False) * np.float32(1e-3)).astype(np.float32)
        residual[: min(n, 3)] = [np.nan, np.inf, -0.0][: min(n, 3)]
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    offset = OFFSETS[n % len(OFFSETS)]
    got, got_res = host.encode(x, "float32", stochastic, seed, offset,
                               None if residual is None else residual.copy(), shift)
    want_res = None if residual is None else residual.copy()
    want = oracle.encode(x, "stochastic" if stochastic else "nearest", seed, offset, want_res)
    assert_bits_equal(got, want, "payload")
    if residual is not None:
        assert_bits_equal(got_res, want_res, "residual")


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_encode_float32_large(host, stochastic):
    n = (1 << 20) + 3
    rng = np.random.default_rng(7)
    x = random_values(rng, n, stochastic)
    got, _ = host.encode(x, "float32", stochastic, 2**64 - 1, 99, None, 0)
    want = oracle.encode(x, "stochastic" if stochastic else "nearest", 2**64 - 1, 99)
    assert_bits_equal(got, want, "payload")


@pytest.mark.parametrize("offset", [0, 2**32 - 8])
def test_encode_stochastic_ties(host, offset):
    """Exact ties u * STEP[k] == r - F[k] round down (the comparison is strict)."""
    rng = np.random.default_rng(offset % 1000)
    x = stochastic_tie_values(21, offset, 2000, rng)
    got, _ = host.encode(x, "float32", True, 21, offset, None, 0)
    want = oracle.encode(x, "stochastic", 21, offset)
    assert_bits_equal(got, want, "payload")
    # The construction must really produce ties, or this test proves nothing.
    q = want.reshape(-1, 6)[:, 0].astype(np.intp)
    r = np.abs(x.reshape(-1, 8)) * fmt.INV_SCALE[q][:, None]
    k = np.searchsorted(fmt.LEVEL_FRACTION, r, side="right") - 1
    u = fmt.uniform24(fmt.stream_key(21), offset + np.arange(x.size, dtype=np.uint64))
    u = (u.astype(np.float32) * np.float32(2.0**-24)).reshape(-1, 8)
    kc = np.minimum(k, 14)
    ties = (u * fmt.LEVEL_STEP[kc]) == (r - fmt.LEVEL_FRACTION[kc])
    assert ties.sum() > 1000


@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 9, 1000, 65536 + 5])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_encode_half_inputs(host, kind, n, stochastic, with_residual, shift):
    rng = np.random.default_rng([n, int(stochastic), int(with_residual), shift, len(kind)])
    if n > 65536:  # every bit pattern (NaNs, Infs, subnormals included), then random
        bits = np.concatenate([np.arange(65536), rng.integers(0, 65536, n - 65536)])
        bits = rng.permutation(bits).astype(np.uint16)
    else:
        bits = to_kind(random_values(rng, n, stochastic), kind)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32) if with_residual else None
    got, got_res = host.encode(bits, kind, stochastic, 5, 17,
                               None if residual is None else residual.copy(), shift)
    want_res = None if residual is None else residual.copy()
    want = oracle.encode(from_kind(bits, kind), "stochastic" if stochastic else "nearest",
                         5, 17, want_res)
    assert_bits_equal(got, want, "payload")
    if residual is not None:
        assert_bits_equal(got_res, want_res, "residual")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_decode(host, n, kind, shift):
    rng = np.random.default_rng([n, len(kind), shift])
    payload = scribble_tail(oracle.encode(random_values(rng, n))[None], n, rng)[0]
    # Arbitrary bytes are valid payloads too (q = 255 with stray signs/codes included).
    garbage = rng.integers(0, 256, payload.size).astype(np.uint8)
    for p in (payload, garbage):
        got = host.decode(p, n, kind, shift)
        ref = oracle.decode(p, n)
        want = {"float32": ref, "float16": f16_reference(ref),
                "bfloat16": bf16_reference(ref)}[kind]
        assert_bits_equal(got, want, f"decode {kind}")


def test_decode_every_level(host):
    """All 255 x 16 x 2 decoded values plus NaN, through every output kind."""
    payload, n = every_level_payload()
    ref = oracle.decode(payload, n)
    assert_bits_equal(host.decode(payload, n, "float32", 0), ref, "float32")
    assert_bits_equal(host.decode(payload, n, "float16", 0), f16_reference(ref), "float16")
    assert_bits_equal(host.decode(payload, n, "bfloat16", 0), bf16_reference(ref), "bfloat16")


@pytest.mark.parametrize("n", [1, 7, 9, 1000])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, -2.0, 1e-35, 0.0])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_decode_accumulate(host, n, k, scale, shift):
    rng = np.random.default_rng([n, k, shift, int(abs(scale) * 1000)])
    payloads = scribble_tail(random_payloads(rng, k, n), n, rng)
    out = random_values(rng, n, specials=False)
    out[: min(n, 2)] = [-0.0, 1e-42][: min(n, 2)]
    got = host.accumulate(payloads, n, out.copy(), scale, shift)
    want = oracle.decode_accumulate(payloads, n, out.copy(), scale)
    assert_bits_equal(got, want, "decode_accumulate")


def test_decode_accumulate_nan_bits(host):
    """NaN results are the canonical 0x7FC00000 whatever NaN went in."""
    n = 64
    rng = np.random.default_rng(3)
    finite = random_payloads(rng, 2, n, nan_blocks=False)
    out = rng.standard_normal(n).astype(np.float32)
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7FA00001, 0xFFE12345], np.uint32)
    out[::5] = nan_bits[np.arange(out[::5].size) % 4].view(np.float32)
    out[1::7] = np.inf
    for scale in (1.0, -1.0, np.inf, -np.inf):  # inf * 0 and inf - inf: default NaN
        with np.errstate(invalid="ignore", over="ignore"):
            want = oracle.decode_accumulate(finite, n, out.copy(), scale)
        assert_bits_equal(host.accumulate(finite, n, out.copy(), scale, 0), want,
                          f"scale {scale}")
    # NaN blocks into a finite out.
    with_nan = finite.copy()
    with_nan[1, 0::12] = 255
    out = rng.standard_normal(n).astype(np.float32)
    want = oracle.decode_accumulate(with_nan, n, out.copy(), 0.5)
    assert_bits_equal(host.accumulate(with_nan, n, out.copy(), 0.5, 1), want, "NaN blocks")


@pytest.mark.parametrize("n", [1, 8, 9, 1000, 4099])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_reduce_encode(host, n, k, stochastic, with_residual, shift):
    rng = np.random.default_rng([n, k, int(stochastic), int(with_residual), shift])
    payloads = scribble_tail(random_payloads(rng, k, n), n, rng)
    scale = [1.0, -0.25, 1 / 3][n % 3]
    residual = None
    if with_residual:
        residual = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        residual[:1] = np.nan
    offset = OFFSETS[n % len(OFFSETS)]
    got, got_res = host.reduce(payloads, n, scale, stochastic, 11, offset,
                               None if residual is None else residual.copy(), shift)
    want_res = None if residual is None else residual.copy()
    want = oracle.reduce_encode(payloads, n, scale, "stochastic" if stochastic else "nearest",
                                11, offset, want_res)
    assert_bits_equal(got, want, "payload")
    if residual is not None:
        assert_bits_equal(got_res, want_res, "residual")


def test_conversions(host):
    """f32 -> f16 / bf16 on random bits and edge cases; f16 / bf16 -> f32 on all 65536."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    # Concentrate on the half-precision range: subnormals, rounding ties, overflow.
    near = (rng.integers(0x32800000, 0x47900000, 400_000, dtype=np.uint64)
            .astype(np.uint32) & ~np.uint32(rng.integers(0, 2, 400_000) * 0xFFF))
    edges = np.array([0x33000000, 0x33000001, 0x387FE000, 0x387FF000, 0x38800000,
                      0x477FE000, 0x477FEFFF, 0x477FF000, 0x7F800000, 0x7FC00000,
                      0x00000001, 0x80000000, 0x7F7FFFFF, 0x3F808000, 0x3F818000], np.uint32)
    f = np.concatenate([bits, near, near | np.uint32(0x80000000), edges])
    nan = (f & 0x7FFFFFFF) > 0x7F800000
    f[nan] |= np.uint32(0x00400000)  # quiet NaNs: signalling ones differ between NumPy paths
    f = f.view(np.float32)
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    to_f16, to_bf16, from_f16, from_bf16 = host.convert(f, h)
    assert_bits_equal(to_f16, f16_reference(f), "f32 -> f16")
    assert_bits_equal(to_bf16, bf16_reference(f), "f32 -> bf16")
    hnan = (h & 0x7FFF) > 0x7C00
    want_f16 = h.view(np.float16).astype(np.float32)
    assert_bits_equal(from_f16[~hnan], want_f16[~hnan], "f16 -> f32")
    assert np.isnan(from_f16[hnan]).all()
    assert_bits_equal(from_bf16, from_kind(h, "bfloat16"), "bf16 -> f32")
