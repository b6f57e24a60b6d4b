"""Smoke test of ``python -m squinchcomm.bench distill --quick`` (a few seconds)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from squinchcomm.bench import distill as bench  # noqa: E402
from squinchcomm.models import corpus  # noqa: E402


def _format_bytes(k: int, vocab: int) -> int:
    """Bytes per position from the shard format spec: ids, fp16 log-probs, fp32 tau."""
    id_bytes = 2 if vocab <= 65536 else 4
    return k * id_bytes + k * 2 + 4


def test_quick_run_writes_consistent_results(tmp_path):
    bench.main(["--quick", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "distill.json").read_text())
    md = (tmp_path / "distill.md").read_text()
    assert doc["benchmark"] == "distill" and "--quick" in doc["command"]
    assert doc["command"] in md and doc["machine"]["cpu"]

    # Storage table: recomputed from the format spec, not from the module.
    by_vocab = {r["vocab"]: r for r in doc["storage"]}
    assert by_vocab[50_000]["gumbel_bytes"] == 64 * 2 + 64 * 2 + 4 == 260
    assert by_vocab[50_000]["dense_fp16_bytes"] == 100_000
    for r in doc["storage"]:
        assert r["gumbel_bytes"] == _format_bytes(r["k"], r["vocab"])
        entry = 2 + (2 if r["vocab"] <= 65536 else 4)
        assert r["topk_bytes"] == r["topk_k"] * entry <= r["gumbel_bytes"]
        assert (r["topk_k"] + 1) * entry > r["gumbel_bytes"]  # the largest that fits
    k = doc["parameters"]["k"]
    assert by_vocab[256]["gumbel_bytes"] == _format_bytes(k, 256)
    # Files on disk: the payload plus a small header per shard.
    overhead = doc["gumbel_file_bytes_per_position"] - _format_bytes(k, 256)
    assert 0 < overhead * doc["distill_positions"] < 200 * doc["shards_per_seed"]

    # Students: every method ran for every seed, with finite, non-negative KL.
    methods = [r["method"] for r in doc["students"]]
    assert methods == list(bench.METHODS)
    seeds = doc["parameters"]["seeds"]
    for r in doc["students"]:
        assert len(r["kl"]) == len(r["ce"]) == seeds
        assert all(math.isfinite(v) and v >= 0 for v in r["kl"])
        assert all(math.isfinite(v) and v > 0 for v in r["ce"])
        assert r["kl_mean"] == pytest.approx(sum(r["kl"]) / seeds)
    stored = {r["method"]: r["bytes_per_position"] for r in doc["students"]}
    assert stored["gumbel"] == _format_bytes(k, 256)
    assert stored["topk"] <= stored["gumbel"] and stored["dense"] == 512
    for method in methods:
        assert f"| {method}" in md


def test_bad_methods_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--methods", "gumbel,nope", "--out", str(tmp_path)])


def test_word_tokens_by_hand():
    text = "x1 = f(ab_2, 'é')\n\t  \x00"
    assert "".join(bench.TOKEN_RE.findall(text)) == text  # every character is in a token
    assert bench.TOKEN_RE.findall("ab_2 33x+=\n\n  é") == ["ab_2", " ", "33", "x", "+", "=",
                                                          "\n\n  ", "é"]
    c = corpus.Corpus(train=np.frombuffer(b"a a b\x00", np.uint8),
                      val=np.frombuffer(b"b a?", np.uint8), train_files=(), val_files=(),
                      root="", sha256="")
    # train counts: "a" 2, " " 2 ("a" seen first), "b" 1, "\x00" 1; vocab 3 keeps "a", " "
    train, val, info = bench.word_tokens(c, 3)
    assert train.dtype == np.uint16
    assert train.tolist() == [0, 1, 0, 1, 2, 2] and val.tolist() == [2, 1, 0, 2]
    assert info["train_unk"] == pytest.approx(2 / 6) and info["val_unk"] == pytest.approx(0.5)


def test_quick_word_vocabulary_run(tmp_path):
    bench.main(["--quick", "--vocab", "word:512", "--out", str(tmp_path)])
    assert not (tmp_path / "distill.json").exists()
    doc = json.loads((tmp_path / "distill_vocab512.json").read_text())
    md = (tmp_path / "distill_vocab512.md").read_text()
    assert doc["parameters"]["vocab"] == "word:512" and doc["command"] in md
    k = doc["parameters"]["k"]
    assert k == 64 and doc["tokens"]["vocab"] == 512
    assert 0 < doc["tokens"]["val_unk"] < 1
    stored = {r["method"]: r for r in doc["students"]}
    assert stored["gumbel"]["bytes_per_position"] == _format_bytes(64, 512) == 260
    assert stored["topk"]["entries"] == 65 and stored["dense"]["bytes_per_position"] == 1024
    overhead = doc["gumbel_file_bytes_per_position"] - _format_bytes(k, 512)
    assert 0 < overhead * doc["distill_positions"] < 200 * doc["shards_per_seed"]
    for r in doc["students"]:
        assert all(math.isfinite(v) and v >= 0 for v in r["kl"])
    assert "nats per token" in md


@pytest.mark.parametrize("argv", [["--vocab", "word"], ["--vocab", "bpe:100"],
                                  ["--vocab", "word:64", "--k", "64"], ["--k", "256"]])
def test_bad_vocabulary_or_k_is_rejected(tmp_path, argv):
    with pytest.raises(SystemExit):
        bench.main(["--quick", *argv, "--out", str(tmp_path)])
