"""TinyGPT's companion switches: Z-Reg, ReLU^2 + Dynamic Clamping, visibility masks,
and that with every switch off it computes what it did (the teacher dump for distillation:
tests/test_nn_distill.py, tests/test_examples.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from squinchcomm.models.tinygpt import (GPTConfig, TinyGPT, attention_z, document_visibility,
                                        separator_doc_ids, z_means)

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=24)


def tokens(b=3, t=24, seed=1):
    return torch.randint(1, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def nanogpt_forward(model, idx):
    """The pre-companion TinyGPT forward, op for op, from the model's parameters."""
    c = model.config
    x = model.wte.weight[idx] + model.wpe.weight[: idx.size(1)]
    for blk in model.h:
        b, t, d = x.shape
        h = F.layer_norm(x, (d,), blk.ln_1.weight, blk.ln_1.bias)
        q, k, v = F.linear(h, blk.attn.c_attn.weight, blk.attn.c_attn.bias).split(d, dim=2)
        q, k, v = (z.view(b, t, c.n_head, d // c.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        x = x + F.linear(y, blk.attn.c_proj.weight, blk.attn.c_proj.bias)
        h = F.layer_norm(x, (d,), blk.ln_2.weight, blk.ln_2.bias)
        h = F.gelu(F.linear(h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias))
        x = x + F.linear(h, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
    x = F.layer_norm(x, (c.n_embd,), model.ln_f.weight, model.ln_f.bias)
    return F.linear(x, model.wte.weight)


def grads(model, idx, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], idx[:, 1:], **kw)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ all off


def test_every_switch_off_is_the_original_computation():
    idx = tokens()
    model = TinyGPT(GPTConfig(**SMALL))
    explicit_off = TinyGPT(GPTConfig(**SMALL, zreg_coef=0.0, zreg_head_coef=0.0,
                                     zreg_reduction="mean", mlp_act="gelu", clamp=None))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.equal(logits, nanogpt_forward(model, idx[:, :-1]))
    assert torch.equal(loss, F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)))
    logits2, loss2 = explicit_off(idx[:, :-1], idx[:, 1:], visibility=None)
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)
    g, g2 = grads(model, idx), grads(explicit_off, idx)
    assert all(torch.equal(g[n], g2[n]) for n in g)
    assert model.zreg_stats.rows == 0  # nothing recorded when Z-Reg is off


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match="mlp_act"):
        GPTConfig(mlp_act="swish")
    with pytest.raises(ValueError, match="clamp must be"):
        GPTConfig(clamp="minmax")
    with pytest.raises(ValueError, match="limit"):
        GPTConfig(clamp="constant")  # needs clamp_limit
    with pytest.raises(ValueError, match="clamp_limit"):
        GPTConfig(clamp_limit=3.0)
    with pytest.raises(ValueError, match="zreg_coef"):
        GPTConfig(zreg_coef=-1.0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(zreg_coef=1e-3, dropout=0.1)
    with pytest.raises(ValueError, match=r"zreg_reduction must be one of \('sum', 'mean'\)"):
        GPTConfig(zreg_reduction="avg")


# -------------------------------------------------------------------- Z-Reg


def test_zreg_keeps_the_forward_and_changes_the_gradients():
    idx = tokens()
    off = TinyGPT(GPTConfig(**SMALL)).double()
    on = TinyGPT(GPTConfig(**SMALL, zreg_coef=1e-2)).double()
    l_off, loss_off = off(idx[:, :-1], idx[:, 1:])
    l_on, loss_on = on(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(l_on, l_off, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-12, atol=1e-12)
    g_off, g_on = grads(off, idx), grads(on, idx)
    diff = (g_on["h.0.attn.c_attn.weight"] - g_off["h.0.attn.c_attn.weight"]).abs().max()
    assert diff > 1e-6 * g_off["h.0.attn.c_attn.weight"].abs().max()
    # 2 forwards (above and in grads) x layers x heads x B x T query rows
    assert on.zreg_stats.rows == 2 * 2 * 2 * 3 * 23
    assert on.zreg_stats.mean > 0
    on.zreg_stats.reset()
    assert on.zreg_stats.rows == 0


def test_head_zreg_gradient_is_the_explicit_virtual_loss():
    idx = tokens()
    c = 0.05
    on = TinyGPT(GPTConfig(**SMALL, zreg_head_coef=c)).double()
    off = TinyGPT(GPTConfig(**SMALL)).double()
    logits_on, _ = on(idx[:, :-1])
    logits_off, _ = off(idx[:, :-1])
    assert torch.equal(logits_on, logits_off)  # attention untouched, head an identity
    g_on = grads(on, idx)
    off.zero_grad(set_to_none=True)
    logits, loss = off(idx[:, :-1], idx[:, 1:])
    (loss + c * torch.logsumexp(logits, -1).square().sum()).backward()
    for n, p in off.named_parameters():
        torch.testing.assert_close(g_on[n], p.grad, rtol=1e-9, atol=1e-12)


def test_head_zreg_mean_reduction_is_the_explicit_mean_virtual_loss():
    idx = tokens()
    c = 0.5
    on = TinyGPT(GPTConfig(**SMALL, zreg_head_coef=c, zreg_reduction="mean")).double()
    off = TinyGPT(GPTConfig(**SMALL)).double()
    g_on = grads(on, idx)
    off.zero_grad(set_to_none=True)
    logits, loss = off(idx[:, :-1], idx[:, 1:])
    (loss + c * torch.logsumexp(logits, -1).square().mean()).backward()
    for n, p in off.named_parameters():
        torch.testing.assert_close(g_on[n], p.grad, rtol=1e-9, atol=1e-12)


def test_attention_zreg_mean_is_sum_divided_by_the_rows_of_each_call():
    """Each layer's call has B * heads * T query rows: mean with c is sum with c / rows."""
    idx = tokens()
    c, rows = 0.3, 3 * 2 * 23
    mean = TinyGPT(GPTConfig(**SMALL, zreg_coef=c, zreg_head_coef=0.0,
                             zreg_reduction="mean")).double()
    total = TinyGPT(GPTConfig(**SMALL, zreg_coef=c / rows, zreg_head_coef=0.0)).double()
    plain = TinyGPT(GPTConfig(**SMALL, zreg_coef=c, zreg_head_coef=0.0)).double()
    g_mean, g_total, g_plain = grads(mean, idx), grads(total, idx), grads(plain, idx)
    for n in g_mean:
        torch.testing.assert_close(g_mean[n], g_total[n], rtol=1e-9, atol=1e-13)
    w = "h.0.attn.c_attn.weight"
    assert (g_mean[w] - g_plain[w]).abs().max() > 1e-6 * g_plain[w].abs().max()


def test_attention_z_is_the_logsumexp_of_the_attention_rows():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=24, zreg_coef=1e-3)
    model = TinyGPT(cfg).double()
    idx = tokens()[:, :-1]
    # Explicit: the one layer's causal attention logits, logsumexp per query row.
    x = model.wte.weight[idx] + model.wpe.weight[: idx.size(1)]
    h = F.layer_norm(x, (32,), model.h[0].ln_1.weight, model.h[0].ln_1.bias)
    q, k, _ = model.h[0].attn.c_attn(h).split(32, dim=2)
    q, k = (z.view(3, 23, 2, 16).transpose(1, 2) for z in (q, k))
    s = q @ k.transpose(-1, -2) / 4.0
    s = s.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), -math.inf)
    expected = torch.logsumexp(s, -1).abs().mean().item()
    assert attention_z(model, idx) == pytest.approx(expected, rel=1e-9)
    model(idx)
    assert model.zreg_stats.mean == pytest.approx(expected, rel=1e-9)
    # Measured the same way with Z-Reg off (the fused path does not record).
    off = TinyGPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=24)).double()
    assert attention_z(off, idx) == pytest.approx(expected, rel=1e-9)
    assert off.training and off.zreg_stats.rows == 0
    head = torch.logsumexp(off.eval()(idx)[0], -1).abs().mean().item()
    assert z_means(off, idx) == pytest.approx({"attention": expected, "head": head}, rel=1e-9)


# ------------------------------------------------------- ReLU^2 + clamping


@pytest.mark.parametrize("mode", ["rms", "std", "weight", "constant"])
def test_relu2_with_dynamic_clamping_quantizes_the_ffn_and_backprops(mode):
    bits = 4
    cfg = GPTConfig(**SMALL, mlp_act="relu2", clamp=mode, clamp_bits=bits, clamp_multiplier=6.0,
                    clamp_limit=0.05 if mode == "constant" else None)
    model = TinyGPT(cfg)
    seen = []
    model.h[0].mlp.c_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    pre = []
    model.h[0].mlp.c_fc.register_forward_hook(lambda m, inp, out: pre.append(out))
    g = grads(model, tokens())
    h = seen[0].detach()
    # ReLU^2 output on a 4-bit grid over [0, limit]: at most 2^(bits-1) levels, all >= 0.
    levels = torch.unique(h)
    assert levels.min() >= 0 and len(levels) <= 2 ** (bits - 1)
    limit = model.h[0].mlp.clamp.last_limit
    steps = h / (limit / (2 ** (bits - 1) - 1))
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    # The limit each mode should have chosen, from the unquantized ReLU^2 output.
    r2 = torch.relu(pre[0].detach()).square()
    w = model.h[0].mlp.c_fc.weight.detach()
    expected = {"rms": 6.0 * r2.square().mean().sqrt(), "std": 6.0 * r2.std(correction=0),
                "weight": 6.0 * (w.square().mean().sqrt() * math.sqrt(32)) ** 2,
                "constant": torch.tensor(0.05)}[mode]
    torch.testing.assert_close(limit.float(), expected.float(), rtol=1e-5, atol=0)
    assert all(torch.isfinite(v).all() for v in g.values())
    assert g["h.0.mlp.c_fc.weight"].abs().sum() > 0


def test_relu2_without_clamp_is_relu_squared():
    idx = tokens()[:, :-1]
    model = TinyGPT(GPTConfig(**SMALL, mlp_act="relu2"))
    seen = []
    model.h[1].mlp.c_fc.register_forward_hook(lambda m, inp, out: seen.append(out))
    model.h[1].mlp.c_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(idx)
    assert torch.equal(seen[1], torch.relu(seen[0]) ** 2)


# --------------------------------------------------------------- visibility


def test_separator_doc_ids_split_after_each_separator():
    idx = torch.tensor([[0, 7, 7, 0, 0, 9], [5, 5, 5, 5, 5, 5]])
    assert separator_doc_ids(idx).tolist() == [[0, 1, 1, 1, 2, 3], [0] * 6]


def test_document_visibility_is_causal_within_each_document():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    start, limit = document_visibility(doc_ids)
    i = torch.arange(6)[:, None]  # query
    j = torch.arange(6)[None, :]  # key
    for b in range(2):
        same = doc_ids[b][:, None] == doc_ids[b][None, :]
        expected = same & (j <= i)  # (Q, K)
        got = (start[b][None, :] <= i) & (i < limit[b][None, :])
        assert torch.equal(got, expected)


@pytest.mark.parametrize("zreg", [0.0, 1e-2])
def test_one_document_per_sequence_is_the_causal_model(zreg):
    model = TinyGPT(GPTConfig(**SMALL, zreg_coef=zreg)).double()
    idx = tokens()[:, :-1]
    vis = document_visibility(torch.zeros_like(idx))
    torch.testing.assert_close(model(idx, visibility=vis)[0], model(idx)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zreg", [0.0, 1e-2])
def test_packed_documents_do_not_see_each_other(zreg):
    model = TinyGPT(GPTConfig(**SMALL, zreg_coef=zreg)).double()
    idx = tokens()[:, :-1]  # (3, 23)
    idx[:, 9] = 0  # a file separator: document 0 is idx[:, :10], document 1 the rest
    vis = document_visibility(separator_doc_ids(idx))
    other = idx.clone()
    other[:, :9] = tokens(3, 9, seed=7)  # new text in document 0 only
    a, _ = model(idx, visibility=vis)
    b, _ = model(other, visibility=document_visibility(separator_doc_ids(other)))
    torch.testing.assert_close(a[:, 10:], b[:, 10:], rtol=1e-12, atol=1e-12)
    assert (a[:, :10] - b[:, :10]).abs().max() > 1e-3  # document 0 did change
    # Without the mask, document 1 would depend on document 0.
    assert (model(idx)[0][:, 10:] - model(other)[0][:, 10:]).abs().max() > 1e-3
    # Gradients flow through the masked path.
    g = grads(model, torch.cat([idx, idx[:, :1]], 1), visibility=vis)
    assert g["h.0.attn.c_attn.weight"].abs().sum() > 0


def test_bad_visibility_is_refused():
    model = TinyGPT(GPTConfig(**SMALL))
    idx = tokens()[:, :-1]
    with pytest.raises(ValueError, match="shape of idx"):
        start, limit = document_visibility(torch.zeros_like(idx))
        model(idx, visibility=(start[:, :-1], limit[:, :-1]))
    with pytest.raises(ValueError, match="start, limit"):
        model(idx, visibility=torch.zeros_like(idx))
