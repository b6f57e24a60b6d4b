"""Smoke tests of ``python -m squinchcomm.bench zreg --quick`` and ``qat --quick``:
the JSON fields, and quantities recomputed here from the model's definition."""

import json
import math

import pytest

torch = pytest.importorskip("torch")

from squinchcomm.bench.__main__ import main as bench_main  # noqa: E402
from squinchcomm.models import corpus  # noqa: E402
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors  # noqa: E402

QUICK = dict(n_layer=1, n_embd=32, n_head=2, block_size=32)  # the --quick model


def _embed(model, idx):
    return model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))


@torch.no_grad()
def _explicit_attention_z(model, idx):
    """Mean |logsumexp| of the causal attention rows of a 1-layer model, written out."""
    x = model.h[0].ln_1(_embed(model, idx))
    b, t, c = x.shape
    nh = model.config.n_head
    q, k, _ = model.h[0].attn.c_attn(x).split(c, dim=2)
    q, k = (z.view(b, t, nh, c // nh).transpose(1, 2).double() for z in (q, k))
    s = q @ k.transpose(-2, -1) / math.sqrt(c // nh)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    return s.logsumexp(-1).abs().mean().item()


@torch.no_grad()
def _explicit_ffn_rms(model, idx):
    """RMS of relu(c_fc(ln_2(h)))**2 of a 1-layer model, written out."""
    block = model.h[0]
    x = _embed(model, idx)
    h = x + block.attn(block.ln_1(x))
    a = torch.relu(block.mlp.c_fc(block.ln_2(h))).square()
    return a.double().pow(2).mean().sqrt().item()


def test_zreg_quick(tmp_path):
    argv = ["zreg", "--quick", "--coefs", "0,1e-3,0.3", "--threads", "1", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    doc = json.loads((tmp_path / "zreg.json").read_text())
    md = (tmp_path / "zreg.md").read_text()
    assert (tmp_path / "zreg_z_curve.png").stat().st_size > 0
    assert doc["benchmark"] == "zreg" and doc["command"] in md
    runs, p = doc["runs"], doc["parameters"]
    assert p["coefs"] == [0.0, 1e-3, 0.3] and p["reduction"] == "mean"
    assert list(runs) == [f"{prec} c={c}" for c in ("0", "0.001", "0.3")
                          for prec in ("fp32", "bf16")]
    data = corpus.load_corpus(max_bytes=1 << 20)
    x_val, _ = batch_tensors(corpus.sample_windows(data.val, p["batch"], p["seq"],
                                                   p["seed"] + 2, step=0))
    model0 = TinyGPT(GPTConfig(**QUICK)).eval()
    z0 = _explicit_attention_z(model0, x_val)
    with torch.no_grad():
        head0 = torch.logsumexp(model0(x_val)[0].double(), -1).abs().mean().item()
    for name, r in runs.items():
        assert r["z_steps"] == list(range(0, p["steps"] + 1, p["every"]))
        assert len(r["z"]) == len(r["head_z"]) == len(r["val_curve"]) == len(r["z_steps"])
        assert len(r["losses"]) == p["steps"]
        assert r["z"][0] == pytest.approx(z0, rel=1e-4)  # same init in every run
        assert r["head_z"][0] == pytest.approx(head0, rel=1e-4)
        assert r["val_curve"][-1] == r["val_loss"]  # the last probe is the final model
        assert all(math.isfinite(v) for v in (r["train_loss"], r["val_loss"]))
        assert r["train_loss"] == pytest.approx(sum(r["losses"][-10:]) / len(r["losses"][-10:]))
        assert f"| {r['coef']:g} | {r['precision']} |" in md
    for prec in ("fp32", "bf16"):  # Z-Reg pulls |Z| down, even in a few steps
        assert runs[f"{prec} c=0.3"]["z"][-1] < runs[f"{prec} c=0"]["z"][-1] - 0.05
        assert runs[f"{prec} c=0.3"]["head_z"][-1] < runs[f"{prec} c=0"]["head_z"][-1]
    for g in doc["gaps"]:
        fp32, bf16 = runs[f"fp32 c={g['coef']:g}"], runs[f"bf16 c={g['coef']:g}"]
        assert g["val_gap"] == bf16["val_loss"] - fp32["val_loss"]
        tail = [sum(r["val_curve"][-4:]) / len(r["val_curve"][-4:]) for r in (fp32, bf16)]
        assert g["val_tail_gap"] == pytest.approx(tail[1] - tail[0], abs=1e-12)
        assert f"| {g['val_gap']:+.4f} |" in md
    assert runs["fp32 c=0"]["losses"] != runs["bf16 c=0"]["losses"]  # autocast was on


def test_qat_quick(tmp_path):
    assert bench_main(["qat", "--quick", "--bits", "4", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "qat.json").read_text())
    md = (tmp_path / "qat.md").read_text()
    assert doc["benchmark"] == "qat" and doc["command"] in md
    p, runs = doc["parameters"], doc["runs"]
    assert list(runs) == ["fp32", "int4 constant", "int4 rms", "int4 weight"]
    data = corpus.load_corpus(max_bytes=1 << 20)
    x1, _ = batch_tensors(corpus.sample_windows(data.train, p["batch"], p["seq"], p["seed"],
                                                step=1))
    rms0 = _explicit_ffn_rms(TinyGPT(GPTConfig(**QUICK, mlp_act="relu2")), x1)
    assert p["calibration_rms"] == pytest.approx(rms0, rel=1e-4)
    assert p["calibrated_limit"] == pytest.approx(p["multiplier"] * rms0, rel=1e-4)
    assert runs["int4 constant"]["limit"] == pytest.approx(p["calibrated_limit"])
    assert runs["fp32"]["sqnr_db"] is None and runs["fp32"]["zeroed"] is None
    for name, r in runs.items():
        assert math.isfinite(r["val_loss"]) and len(r["losses"]) == p["steps"]
        assert f"| {name} |" in md
        if name != "fp32":
            assert r["bits"] == 4 and 0.0 <= r["zeroed"] <= 1.0
            # 4 bits over [-limit, limit]: the SQNR is bounded well below float precision
            assert 0.0 < r["sqnr_db"] < 60.0


@pytest.mark.parametrize("argv, message", [
    (["qat", "--bits", "1"], "--bits must list bit widths >= 2"),
    (["zreg", "--coefs", "0,-1e-3"], "--coefs must be distinct finite numbers >= 0"),
    (["zreg", "--coefs", "1e-3,big"], "--coefs takes a comma list of numbers"),
    (["zreg", "--reduction", "avg"], "invalid choice: 'avg'"),
    # the model-size options are named as in every other command and example
    (["zreg", "--layers", "0"], "--layers must be >= 1, got 0"),
    (["qat", "--heads", "0"], "--heads must be >= 1, got 0"),
    (["zreg", "--n-layer", "2"], "unrecognized arguments: --n-layer 2"),
])
def test_bad_arguments_are_rejected(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench_main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
