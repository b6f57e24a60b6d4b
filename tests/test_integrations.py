"""squinchcomm.integrations with the real frameworks: 2 CPU processes over gloo.

Lightning runs through its own launcher (the job re-runs itself for rank 1),
Accelerate and the Hugging Face Trainer under torchrun. Each framework's jobs (tests/frameworks/*_job.py)
run once per module; every rank saves what it saw. Checked: the hook really
reduced the gradients (its bucket count, and 5.3x fewer bytes than the same
buffers uncompressed), the gradients of the first step are within Squinch's
error bound of the exact average on every element, and not equal to it,
parameters are identical on both ranks, a configuration where the hook is not
in the gradient path raises CompressionNotActiveError on every rank at the
first step, and a checkpoint written by rank 0 gives each rank its own
error-feedback residuals back.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from squinch_data import FP32_SLACK, SQUINCH_C

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "frameworks"
MODES = {"lightning": ["plain", "squinch", "dropped", "save", "resume", "torchrun", "spawn",
                       "fsdp2", "fsdp2_save", "fsdp2_resume"],
         "accelerate": ["plain", "squinch", "unprepared", "dropped", "save", "resume"],
         "transformers": ["plain", "squinch", "dropped", "save", "resume"]}


def _launch(framework, mode, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    script = str(JOBS / f"{framework}_job.py")
    if framework == "lightning" and mode != "torchrun":  # its launcher starts rank 1 itself
        cmd = [sys.executable, script, mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", script, mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [torch.load(out / f"{mode}.rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module", params=sorted(MODES))
def runs(request, tmp_path_factory):
    framework = request.param
    pytest.importorskip(framework)
    out = tmp_path_factory.mktemp(framework)
    return framework, {mode: _launch(framework, mode, out) for mode in MODES[framework]}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).numpy()


def test_the_hook_compresses_every_step(runs):
    framework, r = runs
    for rank in (0, 1):
        s = r["squinch"][rank]
        assert s["buckets_reduced"] >= 3, framework  # one bucket per step at least
        assert s["uncompressed_bytes"] / s["wire_bytes"] == pytest.approx(32 / 6, rel=0.02)
        assert r["plain"][rank]["buckets_reduced"] == 0  # without the integration: no hook


def test_gradients_within_squinch_error_of_the_exact_average(runs):
    """The first step's reduced gradients against the exact average of the two
    ranks' own gradients (recorded before DDP saw them): the plain run within
    fp32 rounding, the Squinch run within the format's bound on every element
    and bit-identical on both ranks."""
    framework, r = runs
    local = {mode: [[t.double().numpy() for t in r[mode][k]["local"]] for k in (0, 1)]
             for mode in ("plain", "squinch")}
    for k in (0, 1):  # the same model, data and first step with and without the hook
        for a, b in zip(local["plain"][k], local["squinch"][k]):
            assert a.tobytes() == b.tobytes(), framework
    mine, other = local["plain"]
    exact = np.concatenate([(a + b).reshape(-1) / 2 for a, b in zip(mine, other)])
    mean_abs = np.concatenate([(abs(a) + abs(b)).reshape(-1) / 2 for a, b in zip(mine, other)])
    # Every parameter's size is a multiple of 8 and DDP lays a bucket's
    # parameters end to end from offset 0, so no 8-block spans two parameters:
    # the largest |g| of a parameter bounds the max of each of its blocks. Two
    # quantizations (each rank's gradient, then the average of the decoded
    # values) err by at most C (2 + C) times the ranks' mean block max
    # (tests/test_ddp_hook.py derives it).
    assert all(a.size % 8 == 0 for a in mine), framework
    block_max = np.concatenate([np.full(a.size, (abs(a).max() + abs(b).max()) / 2)
                                for a, b in zip(mine, other)])
    bound = SQUINCH_C * (2 + SQUINCH_C) * block_max + FP32_SLACK * block_max
    sq = [_flat([r["squinch"][k]["grads"][0]]).astype(np.float64) for k in (0, 1)]
    assert sq[0].tobytes() == sq[1].tobytes(), framework  # bit-identical across ranks
    err = np.abs(sq[0] - exact)
    assert np.all(err <= bound), (framework, float((err / bound).max()))
    assert err.max() > 1e-3 * np.abs(exact).max(), framework  # it was compressed
    for k in (0, 1):
        plain = _flat([r["plain"][k]["grads"][0]]).astype(np.float64)
        assert np.all(np.abs(plain - exact) <= FP32_SLACK * mean_abs + 1e-30), framework
    for mode in ("plain", "squinch", "save"):
        a, b = (_flat(r[mode][k]["params"]) for k in (0, 1))
        assert a.tobytes() == b.tobytes(), (framework, mode)  # identical on both ranks


def test_a_dropped_hook_raises_at_the_first_step_on_every_rank(runs):
    framework, r = runs
    for rank in (0, 1):
        message = r["dropped"][rank]["raised"]
        assert message and "reduced no gradient bucket" in message, (framework, message)
        assert len(r["dropped"][rank]["grads"]) == 1  # it stopped at the first step
    if framework == "accelerate":
        for rank in (0, 1):
            assert "not the DistributedDataParallel that accelerator.prepare() returns" in \
                r["unprepared"][rank]["raised"]


def test_checkpoints_give_every_rank_its_own_residuals(runs):
    framework, r = runs
    saved = [r["save"][k]["saved"]["residuals"] for k in (0, 1)]
    restored = [r["resume"][k]["restored"]["residuals"] for k in (0, 1)]
    for k in (0, 1):
        assert saved[k] and sorted(saved[k]) == sorted(restored[k]), framework
        for name in saved[k]:
            np.testing.assert_array_equal(np.asarray(restored[k][name]["residual"]),
                                          np.asarray(saved[k][name]["residual"]))
    name = sorted(saved[0])[0]  # the two ranks' residuals differ: each got its own
    assert not np.array_equal(np.asarray(saved[0][name]["residual"]),
                              np.asarray(saved[1][name]["residual"]))
    for k in (0, 1):  # and training went on compressed after the resume
        assert r["resume"][k]["buckets_reduced"] >= 1


def test_lightning_launchers_train_alike(runs):
    """torchrun and Lightning's spawn launcher give the parameters of its
    default (popen) launcher, bit for bit, with the hook compressing."""
    framework, r = runs
    if framework != "lightning":
        pytest.skip("Lightning's launchers")
    for mode in ("torchrun", "spawn"):
        for k in (0, 1):
            assert r[mode][k]["buckets_reduced"] >= 3, mode
            assert _flat(r[mode][k]["params"]).tobytes() == \
                _flat(r["squinch"][k]["params"]).tobytes(), mode


def test_lightning_fsdp2_reduce_scatters_are_compressed(runs):
    """ModelParallelStrategy (FSDP2, fully_shard in configure_model) with the
    SquinchFSDP callback: both sharded layers' reduce-scatters compressed at
    every step, and the gathered parameters identical on both ranks."""
    framework, r = runs
    if framework != "lightning":
        pytest.skip("Lightning's FSDP2 strategy")
    for k in (0, 1):
        s = r["fsdp2"][k]
        assert s["units"] == ["net", "net.0", "net.2"]
        assert s["buckets_reduced"] == 2 * 3  # the two layers' units, 3 steps
        assert s["uncompressed_bytes"] / s["wire_bytes"] == pytest.approx(32 / 6, rel=0.02)
    assert _flat(r["fsdp2"][0]["params"]).tobytes() == _flat(r["fsdp2"][1]["params"]).tobytes()
    plain = _flat(r["plain"][0]["params"])  # and it trained like the uncompressed run
    assert np.linalg.norm(_flat(r["fsdp2"][0]["params"]) - plain) < 0.05 * np.linalg.norm(plain)


def test_lightning_fsdp2_checkpoints_give_every_rank_its_residuals(runs):
    framework, r = runs
    if framework != "lightning":
        pytest.skip("Lightning's FSDP2 strategy")
    saved = [r["fsdp2_save"][k]["saved"][f"rank{k}"] for k in (0, 1)]
    restored = [r["fsdp2_resume"][k]["restored"][f"rank{k}"] for k in (0, 1)]
    for k in (0, 1):
        assert len(saved[k]) == 2 and sorted(saved[k]) == sorted(restored[k])  # two units
        for name in saved[k]:
            np.testing.assert_array_equal(np.asarray(restored[k][name]["residual"]),
                                          np.asarray(saved[k][name]["residual"]))
    name = sorted(saved[0])[0]
    assert not np.array_equal(np.asarray(saved[0][name]["residual"]),
                              np.asarray(saved[1][name]["residual"]))


def test_lightning_fsdp1_strategy_is_refused_with_the_fix():
    """SquinchFSDP under Lightning's FSDP1 FSDPStrategy: a ValueError naming
    ModelParallelStrategy (at on_fit_start, which every rank runs), not the
    generic "no FSDP2 unit" or uncompressed training."""
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from squinchcomm.integrations.lightning import SquinchFSDP

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError,
                       match="FSDPStrategy wraps the model in FSDP1.*ModelParallelStrategy"):
        SquinchFSDP().on_fit_start(trainer, torch.nn.Linear(8, 8))
