"""The benchmark scripts themselves, run for real at smoke sizes on CPU."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SHARED_IMDB, assert_ok


@pytest.mark.dist  # DeepSpeed engines in subprocesses, and the HF Trainer: not for `make test-fast`
def test_gpu_speed_smoke_compares_equal_batches(tmp_path, base_env):
    """benchmarks/gpu_speed.py --smoke: both arms (dapt and the HF Trainer reference) at the same micro
    batch and accumulation, finite throughputs, and only results.json in the output folder."""
    pytest.importorskip("accelerate", reason="the HF Trainer reference needs accelerate (pip install -e '.[bench]')")
    if not (SHARED_IMDB / "train.parquet").exists():
        pytest.skip("../shared/data/imdb not present")
    out = tmp_path / "out"
    env = dict(base_env, OUT=str(out), PATH=f"{sys.executable.rsplit('/', 1)[0]}:{base_env.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_speed.py", "--smoke", "--data", str(SHARED_IMDB)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    assert [p.name for p in out.iterdir()] == ["results.json"]  # models, checkpoints, logs: scratch only
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] and res["card"] == "cpu"
    batch = res["batch"]
    assert batch["effective_batch_size"] == batch["micro_batch_size"] * batch["gradient_accumulation_steps"]
    for stage in ("mlm", "finetune"):
        dapt, ref = res[f"{stage}_dapt"], res[f"{stage}_reference"]
        for arm in (dapt, ref):  # what each arm actually ran with
            assert (arm["micro_batch_size"], arm["gradient_accumulation_steps"]) == (
                batch["micro_batch_size"], batch["gradient_accumulation_steps"])
            assert math.isfinite(arm["tokens_per_s"]) and arm["tokens_per_s"] > 0 and arm["steps"] > 0
        assert math.isfinite(ref["slots_per_s"]) and ref["slots_per_s"] >= ref["tokens_per_s"]
    assert res["eval"]["n_examples"] == res["samples"]
    assert all(math.isfinite(v) and v > 0 for v in res["projection"].values())


def _probe_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import linear_probe

    return linear_probe


def _sentiment_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Made-up reviews whose label is carried by a few words among neutral filler of varying length."""
    rng = np.random.default_rng(seed)
    good, bad = ["great", "wonderful", "superb", "moving"], ["awful", "boring", "terrible", "dull"]
    filler = "the film has a plot and actors and a director and music in it".split()
    labels = rng.integers(0, 2, n)
    texts = [" ".join([*rng.choice(filler, rng.integers(3, 40)), *rng.choice(good if y else bad, 3)])
             for y in labels]
    return texts, labels


def test_linear_probe_features_cache_pooling_and_a_separable_task(tmp_path, tiny_model, monkeypatch):
    """benchmarks/linear_probe.py (the probe of benchmarks/dapt_gain.py): mean pooling ignores padding
    (a text's features do not depend on its batch), features are cached by model, texts and settings,
    and a logistic regression on balanced draws separates reviews whose words carry the label."""
    lp = _probe_module()
    texts, labels = _sentiment_texts(240, seed=0)
    cache = tmp_path / "feats" / "pool"
    feats = lp.features(tiny_model, texts, cache, max_seq_length=64, head_tokens=16)
    assert feats.shape == (240, 32) and feats.dtype == np.float32 and np.isfinite(feats).all()
    # pooling over real tokens only: each text alone (no padding) gives the same row
    for i in (0, int(np.argmin([len(t) for t in texts]))):
        alone = lp.encode_features(tiny_model, [texts[i]], max_seq_length=64, head_tokens=16)
        np.testing.assert_allclose(alone[0], feats[i], rtol=1e-4, atol=1e-5)
    # cached: a second call does not encode; other texts or settings do
    calls = []
    real = lp.encode_features
    monkeypatch.setattr(lp, "encode_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(lp.features(tiny_model, texts, cache, 64, 16), feats)
    assert calls == []
    lp.features(tiny_model, texts[:-1], cache, 64, 16)
    lp.features(tiny_model, texts[:-1], cache, 48, 16)
    assert len(calls) == 2
    draws = lp.balanced_draws(labels[:160], size=40, n_draws=5, seed=0)
    assert all(len(ix) == 40 and labels[ix].sum() == 20 and len(set(ix)) == 40 for ix in draws)
    assert all(ix.max() < 160 for ix in draws)
    right = lp.probe_correct(feats[:160], labels[:160], feats[160:], labels[160:], draws)
    assert right.shape == (5, 80) and right.dtype == bool
    # a random encoder, 40 labels per draw, the label words diluted by up to 40 filler words: well above chance
    assert right.mean() > 0.75
    with pytest.raises(ValueError, match="fewer than"):
        lp.balanced_draws(labels[:30], size=40, n_draws=2, seed=0)
    with pytest.raises(ValueError, match="even size"):
        lp.balanced_draws(labels, size=41, n_draws=2, seed=0)


def test_suite_profile_report_sums_wall_time_and_idle_cores():
    """benchmarks/suite_profile.py: per module, the tests' wall time and the idle core-seconds of the
    samples inside them; overall, the core-seconds of work and the wall time they bound."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite_profile

    busy = {100: 1.0, 101: 0.5, 102: 0.5, 103: 0.25}
    spans = [("tests/test_a.py::x", 99.5, 101.5), ("tests/test_a.py::y", 101.5, 102.2),
             ("tests/test_b.py::z", 102.5, 103.9)]
    lines = suite_profile.report(spans, busy, cores=2).splitlines()
    # test_a: 2.7 s wall; samples 100, 101 (x) and 102 (y): used 2.0 of 3 -> 66.7% busy, 2 x 1.0 idle core-s
    assert lines[1].split() == ["tests/test_a.py", "2", "2.7", "66.7%", "2.0"]
    assert lines[2].split() == ["tests/test_b.py", "1", "1.4", "25.0%", "1.5"]
    assert lines[3].startswith("whole run: 4 s sampled, cores busy 56.2%, 4 core-seconds of work (2 cores): "
                               "at least 2 s")
    total, idle = suite_profile.cpu_times()
    assert total > idle > 0
