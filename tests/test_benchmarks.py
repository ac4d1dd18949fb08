"""The benchmark scripts themselves, run for real at smoke sizes on CPU."""
import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_IMDB, assert_ok


@pytest.mark.dist  # DeepSpeed ranks under the real launcher, and the HF Trainer: not for `make test-fast`
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
