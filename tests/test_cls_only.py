"""The [CLS]-only last layer (dapt.model.surgery.cls_only_last_layer) changes cost, not results."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dapt.model.surgery import cls_only_last_layer


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cls_only_last_layer_matches_the_dense_model(attn):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, attn_implementation=attn)
    dense = BertForSequenceClassification(config).eval()  # eval: no dropout, so both draw nothing
    fast = cls_only_last_layer(copy.deepcopy(dense))
    ids = torch.randint(5, 500, (4, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[3, 7:] = 0
    labels = torch.tensor([0, 1, 1, 0])
    for attention_mask in (mask, None):
        a = dense(input_ids=ids, attention_mask=attention_mask, labels=labels)
        b = fast(input_ids=ids, attention_mask=attention_mask, labels=labels)
        assert torch.allclose(a.logits, b.logits, atol=1e-6) and a.logits.abs().max() > 0
        a.loss.backward()
        b.loss.backward()
        for (name, p), q in zip(dense.named_parameters(), fast.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
        dense.zero_grad()
        fast.zero_grad()
    # padding really is masked: the padded row's logits do not depend on what the padding holds
    noisy = ids.clone()
    noisy[3, 7:] = 1
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=noisy, attention_mask=mask).logits,
                              fast(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    assert fast.state_dict().keys() == dense.state_dict().keys()


def test_other_models_are_left_alone():
    model = torch.nn.Linear(2, 2)
    assert cls_only_last_layer(model) is model and "forward" not in vars(model)
