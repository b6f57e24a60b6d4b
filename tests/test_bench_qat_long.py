"""Tests of the weight decay of ``train_run`` (qat's ``--weight-decay``) and qat's
activation RMS curve."""

import json

import pytest

torch = pytest.importorskip("torch")

from squinchcomm.bench.__main__ import main as bench_main  # noqa: E402
from squinchcomm.bench.zreg import train_run  # noqa: E402
from squinchcomm.models import corpus  # noqa: E402
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT  # noqa: E402

CONFIG = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32, mlp_act="relu2")
ARGS = dict(lr=3e-3, batch=2, seq=16, seed=3)


def _data():
    return corpus.load_corpus(max_bytes=1 << 18)


def test_one_step_decays_only_the_matrices():
    # AdamW is decoupled: after one step p_wd - p_0wd = -lr * wd * p_init, for decayed tensors.
    data, wd = _data(), 0.5
    init = dict(TinyGPT(CONFIG).named_parameters())
    runs = [dict(train_run(CONFIG, data, 1, ARGS["batch"], ARGS["seq"], ARGS["lr"], ARGS["seed"],
                           weight_decay=w)["model"].named_parameters()) for w in (0.0, wd)]
    for name, p0 in init.items():
        expected = -ARGS["lr"] * wd * p0 if p0.dim() >= 2 else torch.zeros_like(p0)
        torch.testing.assert_close(runs[1][name] - runs[0][name], expected.detach(),
                                   atol=1e-7, rtol=1e-4, msg=name)


def test_quick_run_with_two_weight_decays(tmp_path):
    assert bench_main(["qat", "--quick", "--bits", "4", "--weight-decay", "0,0.5",
                       "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "qat.json").read_text())
    md = (tmp_path / "qat.md").read_text()
    runs, steps = doc["runs"], doc["parameters"]["steps"]
    assert list(runs) == [f"{n} wd={w}" for w in ("0", "0.5")
                          for n in ("fp32", "int4 constant", "int4 rms", "int4 weight")]
    for name, r in runs.items():
        assert r["baseline"] == "fp32 wd=" + name.split("wd=")[1]
        assert r["weight_decay"] == float(name.split("wd=")[1])
        assert r["probe_steps"][0] == 0 and r["probe_steps"][-1] == steps
        assert r["act_rms_curve"][-1] == pytest.approx(r["act_rms_ratio"])
        assert md.count(f"| {name} |") == 2  # results table and RMS curve table
    # the same init: the activation RMS at step 0 does not depend on the weight decay
    assert runs["fp32 wd=0"]["act_rms_curve"][0] == runs["fp32 wd=0.5"]["act_rms_curve"][0]


@pytest.mark.parametrize("value", ["-1", "0,0", "x"])
def test_bad_weight_decay_is_rejected(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        bench_main(["qat", "--quick", "--weight-decay", value, "--out", str(tmp_path)])
    assert "--weight-decay must" in capsys.readouterr().err
