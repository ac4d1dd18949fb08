"""Whole-word masking (`--whole_word_mask`, dapt/data/mlm.py mask_words): words, not WordPiece pieces, are
chosen; every piece of a chosen word is a target; ~mlm_probability of the words; seeded per batch like
per-piece masking; special tokens never. A tiny MLM run with it: test_sweep.py's pipeline sweep."""
import json

import pytest
import torch

from dapt.config import MLMConfig, parse_config
from dapt.data.batching import batch_seed
from dapt.data.demo import write_demo_data
from dapt.data.mlm import MLMCollator, mask_tokens, mask_words, word_continuations
from dapt.errors import DaptError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def continuation(tokenizer):
    return word_continuations(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer, tmp_path_factory):
    """Packed blocks of the demo reviews plus rare words that split into many pieces: 64 rows x 128."""
    files = write_demo_data(tmp_path_factory.mktemp("wwm_data"), n_unlabelled=300, n_train=0, n_test=0)
    texts = [json.loads(line)["text"] for line in files["unlabelled"].read_text().splitlines()]
    texts = [t + " The cinematographer's unbelievably overhyped pseudointellectualism disappointed Sundance." for t in texts]
    stream = [i for t in texts for i in tokenizer(t)["input_ids"]]
    rows, width = 64, 128
    assert len(stream) >= rows * width
    return torch.tensor(stream[:rows * width]).view(rows, width)


def words_of(row, special, continuation):
    """Independent reference: lists of positions, one per word (a piece plus the `##` pieces after it; a
    `##` piece at the start of the row or after a special token starts its own)."""
    words, prev_special = [], True
    for pos, tok in enumerate(row.tolist()):
        if tok in special:
            prev_special = True
            continue
        if continuation[tok] and not prev_special:
            words[-1].append(pos)
        else:
            words.append([pos])
        prev_special = False
    return words


def _mask(batch, tokenizer, continuation, seed, probability=0.15):
    gen = torch.Generator().manual_seed(seed)
    return mask_words(batch, tokenizer.all_special_ids, continuation, tokenizer.mask_token_id, len(tokenizer),
                      probability, gen)


def test_continuations_come_from_the_vocabulary(tokenizer, continuation):
    ids = tokenizer("unbelievably overhyped")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [bool(continuation[i]) for i in ids] == [p.startswith("##") for p in pieces]
    assert sum(p.startswith("##") for p in pieces) >= 3  # the example really has multi-piece words
    assert not continuation[tokenizer.all_special_ids].any()


def test_whole_words_are_targets_together_never_special_tokens(batch, tokenizer, continuation):
    special = set(tokenizer.all_special_ids)
    inputs, labels = _mask(batch, tokenizer, continuation, seed=7)
    target = labels != -100
    multi_piece_chosen = 0
    for r in range(batch.shape[0]):
        assert target[r].any()  # every row keeps a target
        for word in words_of(batch[r], special, continuation):
            states = {bool(target[r, p]) for p in word}
            assert len(states) == 1, (r, word)  # all pieces of a word or none: never a partial word
            multi_piece_chosen += len(word) > 1 and states == {True}
        for p in range(batch.shape[1]):
            if int(batch[r, p]) in special:
                assert not target[r, p] and inputs[r, p] == batch[r, p]
    assert multi_piece_chosen > 10  # the property is tested on real multi-piece words
    assert torch.equal(labels[target], batch[target])  # labels are the original pieces
    assert torch.equal(inputs[~target], batch[~target])  # nothing else changes
    replaced = inputs[target]
    share_mask = float((replaced == tokenizer.mask_token_id).float().mean())
    assert 0.7 < share_mask < 0.9  # 80/10/10 per piece


def test_the_rate_is_per_word(batch, tokenizer, continuation):
    special = set(tokenizer.all_special_ids)
    chosen_words = total_words = chosen_pieces = pieces = 0
    for seed in range(4):  # 4 x 64 rows x 128 pieces
        _, labels = _mask(batch, tokenizer, continuation, seed=seed)
        for r in range(batch.shape[0]):
            words = words_of(batch[r], special, continuation)
            total_words += len(words)
            chosen_words += sum(labels[r, w[0]] != -100 for w in words)
            pieces += sum(len(w) for w in words)
            chosen_pieces += int((labels[r] != -100).sum())
    rate = chosen_words / total_words
    assert abs(rate - 0.15) < 0.01, rate  # 4 x ~6,700 words: the standard error is ~0.002
    # per piece, the rate is the per-word rate weighted by word length: near 15% as well
    assert 0.12 < chosen_pieces / pieces < 0.2


def test_seeded_per_batch_deterministic(batch, tokenizer, continuation):
    a = _mask(batch, tokenizer, continuation, seed=3)
    b = _mask(batch, tokenizer, continuation, seed=3)
    c = _mask(batch, tokenizer, continuation, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # through the collator: the same seed/epoch/batch index gives the same masks, another epoch others
    rows = {"input_ids": batch[:8].tolist(), "_index": [40, 41, 42, 43, 44, 45, 46, 47]}

    def collate(epoch):
        return MLMCollator(special_ids=tuple(tokenizer.all_special_ids), mask_id=tokenizer.mask_token_id,
                           vocab_size=len(tokenizer), probability=0.15, seed=11, epoch=epoch,
                           pad_id=tokenizer.pad_token_id, continuation=continuation)(rows)

    assert torch.equal(collate(0)["labels"], collate(0)["labels"])
    assert not torch.equal(collate(0)["labels"], collate(1)["labels"])


def test_per_piece_masking_is_unchanged_without_it(batch, tokenizer):
    """The collator without `continuation` is BERT's per-piece masking, as before (same generator draws)."""
    rows = {"input_ids": batch[:8].tolist(), "_index": [0, 1, 2, 3, 4, 5, 6, 7]}
    collator = MLMCollator(special_ids=tuple(tokenizer.all_special_ids), mask_id=tokenizer.mask_token_id,
                           vocab_size=len(tokenizer), probability=0.15, seed=11, epoch=0, pad_id=0)
    gen = torch.Generator().manual_seed(batch_seed(11, 1, 0))
    inputs, labels = mask_tokens(batch[:8], tokenizer.all_special_ids, tokenizer.mask_token_id, len(tokenizer), 0.15, gen)
    out = collator(rows)
    assert torch.equal(out["input_ids"], inputs) and torch.equal(out["labels"], labels)


def test_a_row_without_a_chosen_word_still_gets_one(batch, tokenizer, continuation):
    _, labels = _mask(batch, tokenizer, continuation, seed=0, probability=1e-9)
    assert all((labels[r] != -100).any() for r in range(batch.shape[0]))


def test_a_vocabulary_without_pieces_is_refused():
    class Bpe:
        name_or_path = "some-bpe"

        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["a", "Ġb", "c"]

    with pytest.raises(DaptError, match="whole_word_mask needs a WordPiece vocabulary.*some-bpe"):
        word_continuations(Bpe())


def test_the_flag_and_the_recipe_key(tmp_path):
    """`--whole_word_mask` (and `whole_word_mask: true` in a recipe's mlm section) turn it on; off by default.
    A real MLM run with it (1 epoch, tiny model) is the MLM stage of test_sweep.py's pipeline sweep, whose
    recipe sets it: that test checks the run's config and that its losses are finite."""
    assert parse_config(MLMConfig, "mlm", ["--output_dir", "x"]).whole_word_mask is False
    assert parse_config(MLMConfig, "mlm", ["--output_dir", "x", "--whole_word_mask"]).whole_word_mask is True
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mlm:\n  whole_word_mask: true\n")
    assert parse_config(MLMConfig, "mlm", ["--config", str(recipe), "--output_dir", "x"]).whole_word_mask is True
