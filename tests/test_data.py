import collections

import pytest
import torch
from conftest import SHARED_IMDB

from dapt.config import MLMConfig
from dapt.data.batching import eval_shard, num_eval_batches, sharded_batches, steps_per_epoch, train_batches
from dapt.data.classify import tokenize_for_classification
from dapt.data.mlm import MLMCollator, mask_tokens, pack_blocks, tokenize_for_mlm
from dapt.data.sources import load_table
from dapt.data.text import clean_text, truncate_ids
from dapt.distributed import DistInfo
from dapt.errors import DaptError


def test_clean_text_removes_html_breaks():
    assert clean_text("Great.<br /><br />Loved it.<BR>Really<br/>.") == "Great. Loved it. Really ."


def test_truncate_head_and_head_tail():
    ids = list(range(1000))
    assert truncate_ids(ids, 510, "head", 128) == list(range(510))
    kept = truncate_ids(ids, 510, "head+tail", 128)
    assert kept == list(range(128)) + list(range(1000 - 382, 1000)) and len(kept) == 510
    assert truncate_ids(ids[:300], 510, "head+tail", 128) == ids[:300]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def imdb_sample():
    import datasets

    if not (SHARED_IMDB / "train.parquet").exists():
        pytest.skip("../shared/data/imdb not present")
    ds = datasets.load_dataset("parquet", data_files=str(SHARED_IMDB / "train.parquet"), split="train")
    return ds.shuffle(seed=0).select(range(200)).select_columns(["text", "label"])


def test_head_tail_on_real_reviews(tokenizer, imdb_sample):
    data = tokenize_for_classification(imdb_sample, tokenizer, 512, "head+tail", 128)
    assert max(data["length"]) == 512 and any(data["truncated"])
    for text, ids, cut in zip(imdb_sample["text"], data["input_ids"], data["truncated"]):
        full = tokenizer(clean_text(text), add_special_tokens=False)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        if cut:
            assert ids[1:-1] == full[:128] + full[-382:]
        else:
            assert ids[1:-1] == full


def test_packing_gives_full_blocks_without_padding(tokenizer, imdb_sample):
    tokens = tokenize_for_mlm(imdb_sample.select_columns(["text"]), tokenizer)
    stream = [t for ids in tokens["input_ids"] for t in ids]
    blocks = pack_blocks(tokens, 128)
    assert len(blocks) == len(stream) // 128
    assert all(len(b) == 128 for b in blocks["input_ids"])
    assert tokenizer.pad_token_id not in {t for b in blocks["input_ids"] for t in b}
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(blocks) * 128]  # order kept
    collate = MLMCollator(tuple(tokenizer.all_special_ids), tokenizer.mask_token_id, len(tokenizer), 0.15, 0, 0)
    batch = collate({"input_ids": blocks[:8]["input_ids"], "_index": list(range(8))})
    assert "attention_mask" not in batch and batch["input_ids"].shape == (8, 128)  # nothing to mask out


def test_tokenising_maps_are_keyed_without_pickling_the_tokenizer(tokenizer_dir, tmp_path, monkeypatch):
    """The cache key of the tokenising maps (dapt.data.text.tokenize_fingerprint) follows what decides the
    tokens (input, tokenizer pipeline, settings) but not the truncation and padding a call leaves on the
    tokenizer; datasets never pickles the tokenizer for it (~0.15 s a map on every rank); the cached data
    are found again and equal a fresh tokenisation."""
    import datasets
    from datasets.fingerprint import Hasher
    from transformers import AutoTokenizer

    from dapt.data.text import tokenize_fingerprint

    _jsonl(tmp_path / "r.jsonl", [{"text": f"review {i}: a <br />fine film, {'very ' * i}long"} for i in range(40)])
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "r.jsonl"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    tok, same = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    key = tokenize_fingerprint(ds, tok, "dapt.data.mlm", stage="mlm")
    assert key and key == tokenize_fingerprint(ds, same, "dapt.data.mlm", stage="mlm")  # another load of it
    tok("a call that leaves truncation and padding set", truncation=True, max_length=8, padding="max_length")
    assert tokenize_fingerprint(ds, tok, "dapt.data.mlm", stage="mlm") == key
    others = [tokenize_fingerprint(ds.select(range(39)), tok, "dapt.data.mlm", stage="mlm"),
              tokenize_fingerprint(ds, tok, "dapt.data.classify", stage="mlm"),
              tokenize_fingerprint(ds, tok, "dapt.data.mlm", stage="classify")]
    for settings in ({"max_seq_length": 64}, {"max_seq_length": 32}, {"max_seq_length": 64, "strategy": "head"}):
        others.append(tokenize_fingerprint(ds, tok, "dapt.data.classify", stage="classify", **settings))
    same.add_tokens(["zzdaptword"])  # another vocabulary
    others.append(tokenize_fingerprint(ds, same, "dapt.data.mlm", stage="mlm"))
    assert len({key, *others}) == len(others) + 1
    assert tokenize_fingerprint(ds, object(), "dapt.data.mlm") is None  # no serialised pipeline: datasets' own key

    labelled = ds.map(lambda b: {"label": [0] * len(b["text"])}, batched=True)
    hashed = []
    real_hash = Hasher.hash
    monkeypatch.setattr(Hasher, "hash", classmethod(lambda cls, value: hashed.append(value) or real_hash(value)))
    first = tokenize_for_mlm(ds, tok)
    data = tokenize_for_classification(labelled, tok, 16, "head+tail", 4)
    assert not [v for v in hashed if callable(v) or v is tok], hashed  # no function (closure) was pickled
    again = tokenize_for_mlm(ds, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert again.cache_files == first.cache_files and again._fingerprint == first._fingerprint
    assert again["input_ids"] == [tok(clean_text(t))["input_ids"] for t in ds["text"]]
    assert max(data["length"]) == 16 and any(data["truncated"])


def test_masking_rates_and_specials():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (64, 512))
    ids[:, 0], ids[:, -1] = 101, 102
    inputs, labels = mask_tokens(ids, (0, 100, 101, 102, 103), 103, 30522, 0.15, gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert abs(chosen.float().mean().item() - 0.15 * 510 / 512) < 0.005
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 103) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert 0.07 < kept.sum().item() / chosen.sum().item() < 0.13  # 10% kept (+ random hits of the same id)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_masking_keeps_one_target_per_row():
    gen = torch.Generator().manual_seed(1)
    _, labels = mask_tokens(torch.full((50, 4), 2000), (101, 102), 103, 30522, 0.01, gen)
    assert ((labels != -100).sum(1) >= 1).all()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_batches_are_disjoint_and_equal_per_rank(world):
    n, micro, eff = 103, 4, 4 * world * 2
    per_rank = [train_batches(n, 0, 7, r, world, micro, eff) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == steps_per_epoch(n, eff) * 2
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == steps_per_epoch(n, eff) * eff
    assert train_batches(n, 0, 7, 0, world, micro, eff) == per_rank[0]  # deterministic
    assert train_batches(n, 1, 7, 0, world, micro, eff) != per_rank[0]  # reshuffled per epoch


def test_too_little_data_for_one_batch():
    with pytest.raises(DaptError, match="fewer than one effective batch"):
        steps_per_epoch(10, 16)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_eval_shards_cover_every_example_once(world):
    for n in list(range(0, 40)) + [97, 101, 1000]:
        shards = [eval_shard(n, r, world) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        for bs in (1, 3, 8):
            counts = []
            for r in range(world):
                info = DistInfo(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"), backend="gloo")
                batches = list(sharded_batches(max(n, 1), info, bs))
                counts.append(len(batches))
            assert len(set(counts)) == 1 and counts[0] == num_eval_batches(max(n, 1), world, bs)


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_table_validation_errors(tmp_path):
    cfg = MLMConfig(output_dir="x")
    cfg.data_files = [_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])]
    with pytest.raises(DaptError, match="missing column 'text'"):
        load_table(cfg, 0)
    cfg.data_files = [_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, {"text": "   "}])]
    with pytest.raises(DaptError, match="1 empty or non-text value.*row 1"):
        load_table(cfg, 0)
    cfg.data_files = [_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])]
    with pytest.raises(DaptError, match=r"outside \{0, 1\}.*row 1: 2"):
        load_table(cfg, 0, label_column="label")
    cfg.data_files = [str(tmp_path / "missing.parquet")]
    with pytest.raises(DaptError, match="data file not found"):
        load_table(cfg, 0)
    cfg.data_files = [_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 0}, {"text": "bad", "label": 1}])]
    ds = load_table(cfg, 0, label_column="label")
    assert ds.column_names == ["text", "row", "label"] and collections.Counter(ds["label"]) == {0: 1, 1: 1}
    assert ds["row"] == [0, 1]  # each example's position in the input (per-example predictions)


def test_length_bucketing_keeps_batches_random_and_world_size_independent():
    import random

    rng = random.Random(0)
    n, micro, eff = 1000, 4, 32
    lengths = [rng.randint(10, 512) for _ in range(n)]
    steps = {}
    for world in (1, 2, 4):
        per_rank = [train_batches(n, 3, 7, r, world, micro, eff, lengths) for r in range(world)]
        flat = [i for b in per_rank for batch in b for i in batch]
        assert len(flat) == len(set(flat)) == (n // eff) * eff
        accum = eff // (micro * world)
        # the examples of optimizer step s, gathered over ranks and micro-batches
        steps[world] = [sorted(i for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum] for i in b)
                        for s in range(n // eff)]
        # balanced ranks: in each micro-step every rank's batch spans the same length range (each
        # rank's longest review is at least every rank's shortest), so no rank waits for a longer one
        for k in range(len(per_rank[0])):
            spans = [(min(lengths[i] for i in b[k]), max(lengths[i] for i in b[k])) for b in per_rank]
            assert min(hi for _, hi in spans) >= max(lo for lo, _ in spans)
    assert steps[1] == steps[2] == steps[4]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed = train_batches(n, 3, 7, 0, 1, micro, eff, lengths)
    plain = train_batches(n, 3, 7, 0, 1, micro, eff)
    assert padding(bucketed) < 0.2 * padding(plain)
    # the order of batches is still random: lengths of consecutive steps are not sorted
    firsts = [lengths[b[0]] for b in bucketed[:: eff // micro]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


# --- DAPT_CACHE_SCOPE: who tokenises first -----------------------------------------------------------

CACHE_WORKER = '''
import importlib, json, os, sys, time
import datasets.config
import torch, torch.distributed as dist
from transformers import AutoTokenizer
import dapt.data.mlm as mlm
from dapt.config import MLMConfig
from dapt.distributed import DistInfo

importlib.reload(datasets.config)  # a forked rank: read this rank's HF_DATASETS_CACHE, as a fresh process does

dist.init_process_group("gloo")
info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                device=torch.device("cpu"), backend="gloo")
entered = []
load_table = mlm.load_table
def spy(*a, **k):  # the first thing the rank does inside node_main_first's block
    entered.append(time.time())
    if info.rank == 0:
        time.sleep(2)  # rank 0 is slow: a rank that does not wait for it enters before it has written anything
    return load_table(*a, **k)
mlm.load_table = spy
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = MLMConfig(output_dir="x", data_files=[sys.argv[2]], max_seq_length=32, validation_split=0.1)
train, val = mlm.mlm_splits(cfg, info, tok)
files = sorted({f["filename"] for ds in (train, val) for f in ds.cache_files})
json.dump({"rank": info.rank, "entered": entered[0], "blocks": len(train),
           "files": {f: os.stat(f).st_mtime for f in files}},
          open(os.path.join(sys.argv[3], f"rank{info.rank}.json"), "w"))
dist.destroy_process_group()
'''


def _ranks_on_nodes(tmp_path, base_env, tiny_model, data, scope, local_ranks, caches):
    """Two ranks with the environment a launcher gives each (RANK, LOCAL_RANK, ...; forked: tests/ranks.py):
    local_ranks [0, 0] are two nodes, [0, 1] one node, each rank with its own HF_DATASETS_CACHE. Returns
    each rank's report."""
    import json

    import ranks

    worker = tmp_path / "worker.py"
    worker.write_text(CACHE_WORKER)
    rank_env = [{"LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(max(local_ranks) + 1),
                 "HF_DATASETS_CACHE": str(cache)} for local, cache in zip(local_ranks, caches)]
    proc = ranks.run([str(worker), str(tiny_model), str(data), str(tmp_path)], dict(base_env, DAPT_CACHE_SCOPE=scope),
                     2, timeout=240, rank_env=rank_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _tokenised_by_itself(report, cache):
    """The rank's tokenised (and packed) data lie in `cache` and were written after it entered the block."""
    return report["files"] and all(f.startswith(str(cache)) and t >= report["entered"]
                                   for f, t in report["files"].items())


def _reused(report, first):
    """The rank's data are the first rank's files, untouched since before it entered the block."""
    return report["files"] == first["files"] and all(t <= report["entered"] for t in report["files"].values())


@pytest.mark.data
def test_node_local_caches_are_filled_once_per_node(tmp_path, base_env, tiny_model, demo_files):
    """DAPT_CACHE_SCOPE=node, two nodes with their own caches: the local rank 0 of each node tokenises
    into its own cache (no waiting for the other node's, which it could not see)."""
    caches = [tmp_path / "node0_cache", tmp_path / "node1_cache"]
    r0, r1 = _ranks_on_nodes(tmp_path, base_env, tiny_model, demo_files["unlabelled"], "node", [0, 0], caches)
    assert _tokenised_by_itself(r0, caches[0]) and _tokenised_by_itself(r1, caches[1])
    assert r1["entered"] < min(r0["files"].values())  # node 1 did not wait for node 0
    assert r0["blocks"] == r1["blocks"] > 0
    for cache in caches:
        assert list((cache / "dapt_tables").glob("table-*.arrow"))


@pytest.mark.data
@pytest.mark.parametrize("scope,local_ranks", [("shared", [0, 1]), ("shared", [0, 0]), ("node", [0, 1])],
                         ids=["shared", "shared-two-nodes", "node-one-node"])
def test_one_cache_is_filled_by_its_first_rank_only(scope, local_ranks, tmp_path, base_env, tiny_model, demo_files):
    """A cache that both ranks see: with scope shared only global rank 0 tokenises (even with LOCAL_RANK
    0 on both, i.e. nodes on a shared filesystem), and with scope node on one node only local rank 0;
    the other rank starts after it and reuses its files."""
    cache = tmp_path / "shared_cache"
    r0, r1 = _ranks_on_nodes(tmp_path, base_env, tiny_model, demo_files["unlabelled"], scope, local_ranks,
                             [cache, cache])
    assert _tokenised_by_itself(r0, cache) and _reused(r1, r0)
    assert r1["entered"] >= max(r0["files"].values())


def test_cache_scope_setting(monkeypatch):
    from dapt.distributed import cache_scope, is_cache_first

    def info(rank, local):
        return DistInfo(rank=rank, world_size=4, local_rank=local, device=torch.device("cpu"), backend="gloo")

    monkeypatch.delenv("DAPT_CACHE_SCOPE", raising=False)
    assert cache_scope() == "shared"
    assert [is_cache_first(info(r, r % 2)) for r in range(4)] == [True, False, False, False]
    monkeypatch.setenv("DAPT_CACHE_SCOPE", " Node ")
    assert cache_scope() == "node"
    assert [is_cache_first(info(r, r % 2)) for r in range(4)] == [True, False, True, False]
    monkeypatch.setenv("DAPT_CACHE_SCOPE", "nfs")
    with pytest.raises(DaptError, match="DAPT_CACHE_SCOPE=nfs: expected shared or node"):
        cache_scope()
