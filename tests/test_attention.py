"""dapt's chunked CPU attention (dapt.model.attention) computes what SDPA computes, draws dropout as
stated, reproduces under a seed, and is picked only where it pays."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from dapt.model import attention
from dapt.model.attention import chunked_attention, drop_levels, hf_attn_implementation


def qkv(batch=3, heads=4, q_len=20, k_len=20, size=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, size, generator=g, dtype=dtype).requires_grad_()
            for n in (q_len, k_len, k_len)]


def padding_mask(batch, q_len, k_len, kind):
    keep = torch.ones(batch, k_len, dtype=torch.bool)
    keep[0, k_len - 5:] = False
    keep[-1, 3:] = False
    mask = keep[:, None, None, :].expand(batch, 1, q_len, k_len)
    if kind == "float":
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    if kind == "per-head":
        return torch.randn(batch, 4, q_len, k_len)
    return None if kind == "none" else mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "per-head"])
@pytest.mark.parametrize("shape", [(20, 20), (1, 20), (300, 300)])  # 300: heads split over slices
def test_without_dropout_it_is_sdpa(mask_kind, shape, monkeypatch):
    q_len, k_len = shape
    if q_len == 300:
        monkeypatch.setattr(attention, "_CACHE_SCORES", 2 * 300 * 300)  # 2 heads a slice: 2 slices a row
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    mask = padding_mask(3, q_len, k_len, mask_kind)
    ours = chunked_attention(q, k, v, mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_gradients_with_dropout_are_exact():
    """gradcheck in float64 with the same masks on every call (the generator reseeded each time)."""
    q, k, v = qkv(batch=2, heads=2, q_len=6, k_len=7, size=3, dtype=torch.float64)
    mask = padding_mask(2, 6, 7, "bool")

    def f(q, k, v):
        torch.manual_seed(7)
        return chunked_attention(q, k, v, mask, dropout=0.3, scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert not torch.equal(f(q, k, v), chunked_attention(q, k, v, mask, scale=0.7))  # something was dropped


def test_dropout_rate_scale_and_seed():
    """Each score is dropped with probability round(p * 65536) / 65536 and kept ones are scaled so that
    the output is unbiased; the masks follow the default generator, so a seed reproduces them."""
    p = 0.1
    v_len = 256
    q = torch.zeros(1, 1, 64, 4)  # all scores equal: every probability is 1 / v_len
    k = torch.zeros(1, v_len, 4).unsqueeze(0)
    v = torch.ones(1, 1, v_len, 4)
    keep_p = 1 - drop_levels(p) / 65536
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(chunked_attention(q, k, v, dropout=p))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # a row's output is (kept scores / v_len) / keep_p: the kept fraction, divided by keep_p
    kept = torch.cat(outs[1:])[..., 0] * keep_p
    n = kept.numel() * v_len
    assert abs(kept.mean().item() - keep_p) < 4 * (keep_p * (1 - keep_p) / n) ** 0.5
    assert abs(torch.cat(outs[1:]).mean().item() - 1.0) < 0.005  # unbiased
    assert drop_levels(p) == 6554 and drop_levels(0.0) == 0
    with pytest.raises(ValueError, match="dropout"):
        chunked_attention(q, k, v, dropout=1.0)


def tiny_mlm(impl, dropout):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, attention_probs_dropout_prob=dropout,
                        hidden_dropout_prob=0.0)
    return BertForMaskedLM._from_config(config, attn_implementation=hf_attn_implementation(impl))


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_in_a_bert_model(impl):
    """Without attention dropout a BERT trains the same with dapt's attention as with SDPA; with it, the
    masked positions and the padding are respected and a seed reproduces the step."""
    ids = torch.randint(5, 300, (3, 40))
    pad = torch.ones_like(ids)
    pad[1, 30:] = 0
    losses = {}
    for name in ("sdpa", impl):
        model = tiny_mlm(name, 0.0).train()
        out = model(input_ids=ids, attention_mask=pad, labels=ids)
        out.loss.backward()
        losses[name] = (out.loss, model.bert.embeddings.word_embeddings.weight.grad)
    torch.testing.assert_close(losses[impl], losses["sdpa"], atol=1e-5, rtol=1e-4)

    model = tiny_mlm(impl, 0.1).train()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model(input_ids=ids, attention_mask=pad).logits)
    assert torch.equal(runs[0], runs[1])
    noisy = ids.clone()
    noisy[1, 30:] = 7  # what padding holds does not reach the other positions
    torch.manual_seed(3)
    assert torch.equal(model(input_ids=noisy, attention_mask=pad).logits[1, :30], runs[0][1, :30])


def test_auto_picks_the_chunked_kernel_only_where_it_pays(monkeypatch):
    calls = []
    real = attention.chunked_attention_forward
    monkeypatch.setattr(attention, "chunked_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_mlm("auto", 0.1)
    ids = torch.randint(5, 300, (2, 16))
    model.train()(input_ids=ids)
    assert len(calls) == 2  # one per layer
    model.eval()(input_ids=ids)  # evaluation: SDPA (its fused kernel)
    with torch.no_grad():
        model.train()(input_ids=ids)  # no backward coming: SDPA
    tiny_mlm("auto", 0.0).train()(input_ids=ids)  # no dropout: SDPA
    model.to(torch.bfloat16).train()(input_ids=ids)  # half precision: SDPA
    assert len(calls) == 2


def test_exported_config_names_no_dapt_attention(tmp_path):
    """A model trained with dapt's attention loads anywhere: the saved config does not name it."""
    tiny_mlm("auto", 0.1).save_pretrained(tmp_path)
    assert "dapt_" not in (tmp_path / "config.json").read_text()
