"""codec.warm_up() compiles every CPU kernel signature the codec's public
entry points use, so the first real collective compiles nothing.

Run in a fresh interpreter: in this one other tests have already compiled
whatever they called.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("ml_dtypes")

_PROBE = r"""
import json, sys
import numpy as np, ml_dtypes
from squinchcomm import codec
from squinchcomm.codec import _arrays, cpu
from squinchcomm.codec.cast import CastWire

kernels = {name: getattr(cpu, name) for name in dir(cpu)
           if name.endswith("_kernel") and hasattr(getattr(cpu, name), "signatures")}
def counts():
    return {name: len(k.signatures) for name, k in kernels.items()}

before = counts()
seconds = codec.warm_up()
warm = counts()

# Step 2: what the collectives call, on real inputs of every dtype they pass.
rng = np.random.default_rng(0)
n = 1003
for x in (rng.standard_normal(n).astype(np.float32),
          rng.standard_normal(n).astype(ml_dtypes.bfloat16),
          rng.standard_normal(n).astype(np.float16)):
    res = np.zeros(n, np.float32)
    p = codec.encode(x)
    codec.encode(x, rounding="stochastic", seed=3, residual=res)
    codec.decode(p, n)
    codec.decode(p, n, dtype=x.dtype)
    stack = np.stack([p, p])
    acc = np.zeros(n, np.float32)
    codec.decode_accumulate(stack, n, acc, scale=0.5)
    codec.reduce_encode(stack, n, scale=0.5, residual=res)
    for kind in ("float16", "bfloat16"):
        wire = CastWire(kind)
        flat = _arrays.flat_input(x)
        out = np.zeros(2 * n, np.uint8)
        wire.encode(flat, out, res, 0)
        rows = np.stack([out, out])
        wire.decode_accumulate(rows, n, acc, 0.5)
        wire.reduce_encode(rows, n, 0.5, out, res, 0, 0)
        wire.decode(out, n, _arrays.flat_any(np.zeros(n, np.float32)))
        wire.decode(out, n, _arrays.flat_any(np.zeros(n, x.dtype)))
after = counts()
print(json.dumps({"before": before, "warm": warm, "after": after, "seconds": seconds}))
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_up_compiles_every_signature_the_codec_uses():
    r = _probe(SQUINCHCOMM_CODEC_BACKEND="numba")
    assert len(r["warm"]) >= 10, r["warm"]  # every parallel kernel of codec/cpu.py
    assert all(v == 0 for v in r["before"].values()), r["before"]
    missing = [k for k, v in r["warm"].items() if v < 1]
    assert not missing, f"warm_up() leaves these kernels uncompiled: {missing}"
    new = {k: (r["warm"][k], r["after"][k]) for k in r["warm"] if r["after"][k] != r["warm"][k]}
    assert not new, f"compiled after warm_up() (signatures before, after): {new}"
    assert r["seconds"] > 0


def test_warm_up_is_a_no_op_without_numba_backend():
    out = subprocess.run(
        [sys.executable, "-c", "from squinchcomm import codec; print(codec.warm_up())"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SQUINCHCOMM_CODEC_BACKEND": "oracle"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) == 0.0


_WAIT_PROBE = r"""
import fcntl, json, os, tempfile, threading, time
from squinchcomm import codec
import importlib
default = importlib.import_module("squinchcomm.collectives.default")

default._start_warm_up()            # what init() does: compile in a background thread
path = os.path.join(tempfile.gettempdir(), f"squinchcomm-numba-{os.getuid()}.lock")
held = False
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not held:  # until the background compile holds the lock
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
            time.sleep(0.001)
        except BlockingIOError:
            held = True
codec.warm_up()
alive = [t.name for t in threading.enumerate() if t.name == "squinchcomm-warmup"]
print(json.dumps({"held": held, "alive_after": alive}))
"""


def test_warm_up_waits_for_the_background_compile(tmp_path):
    """The examples call warm_up() before timing: it must return only after
    init()'s background compile has finished (no timed step shares the
    cores with it). A fresh cache directory makes the compile long."""
    out = subprocess.run([sys.executable, "-c", _WAIT_PROBE], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "SQUINCHCOMM_CODEC_BACKEND": "numba",
                                           "NUMBA_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["held"], "the background compile never took the machine lock"
    assert r["alive_after"] == [], "warm_up() returned while the background compile still ran"
