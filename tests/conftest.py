"""Shared test helpers: deterministic inputs with the format's special values."""

import os
import zlib

import numpy as np
import pytest


def mixed_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 data over the whole range, with zero blocks, -0.0, subnormals,
    huge (saturating) values and a few NaN/Inf blocks sprinkled in."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-60, 40, n))).astype(np.float32)
    if n >= 64:
        x[0:8] = 0.0  # an all-zero block
        x[8:16] = -0.0
        x[16:24] = rng.standard_normal(8).astype(np.float32) * np.float32(1e-42)  # subnormal
        x[24] = np.float32(3e38)  # saturates at A(254)
        x[32:40] = rng.standard_normal(8).astype(np.float32)
        x[33] = np.nan
        x[41] = np.inf
        x[50] = -np.inf
        x[57] = -0.0
    return x


def stable_seed(nodeid: str) -> int:
    """A 32-bit seed from a test's node id that is the same in every process:
    CRC-32 of its UTF-8 bytes (``hash()`` of a str is salted per process by
    PYTHONHASHSEED, so it would differ between runs and between MPI ranks)."""
    return zlib.crc32(nodeid.encode("utf-8"))


@pytest.fixture
def rng(request):
    # One stream per test (the full node id: file, test and parameters), the
    # same in every run and on every rank, so a failure reproduces.
    return np.random.default_rng(stable_seed(request.node.nodeid))


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs under mpirun (``--with-mpi``, see tests/test_mpi_suites.py);
    the plain run does not import MPI for it."""
    if collection_path.name == "mpi" and collection_path.parent.name == "tests":
        with_mpi = config.getoption("--with-mpi", default=False)
        return None if with_mpi else True
    return None


def no_gpu(reason: str):
    """Skip a GPU test that cannot run here; fail instead when SQUINCHCOMM_TEST_GPU=1
    (so a GPU machine cannot silently skip the GPU suite)."""
    if os.environ.get("SQUINCHCOMM_TEST_GPU") == "1":
        pytest.fail(f"SQUINCHCOMM_TEST_GPU=1 but {reason}")
    pytest.skip(reason)


def cupy_gpu():
    """CuPy, when it reaches a CUDA device (the device check's own probe,
    squinchcomm.bench.gpu_check.gpu_reason); otherwise :func:`no_gpu`."""
    from squinchcomm.bench.gpu_check import gpu_reason

    reason = gpu_reason()
    if reason is not None:
        no_gpu(f"no usable CUDA GPU: {reason}")
    import cupy

    return cupy

