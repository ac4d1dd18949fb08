"""The whole pipeline on one machine: MLM -> fine-tune -> evaluate -> export -> predict.

Each stage runs as its own job under the `deepspeed` launcher (as on a cluster, where each is an
sbatch job), on every local accelerator, or on 2 CPU ranks when there is none. `--demo` writes the
project's synthetic reviews and uses `recipes/demo.yaml`.

    python launch/pipeline.py --demo --output_dir runs/demo
    python launch/pipeline.py --config recipes/imdb-bert-base.yaml --output_dir runs/imdb
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from dapt.config import REPO_ROOT
from dapt.distributed import free_port
from dapt.errors import DaptError, cli_entry
from dapt.metrics import format_table

EXAMPLES = [
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
]


def default_ranks() -> int:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return 2 if acc.device_name() == "cpu" else max(1, acc.device_count())


def deepspeed_command(script: str, ranks: int) -> list[str]:
    """`deepspeed --num_gpus N --master_port <free port> launch/<script>`, with the launcher beside
    this interpreter (a venv), else the one on PATH."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO_ROOT / "launch" / script)]


def run_stage(script: str, ranks: int, args: list[str]) -> None:
    cmd = [*deepspeed_command(script, ranks), *args]
    print(f"\n==> {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    if proc.returncode:
        raise DaptError(f"{script} failed with exit code {proc.returncode}")


def predict(model_dir: Path, texts: Sequence[str]) -> list[dict]:
    """The exported folder through the stock transformers pipeline: what a user of the model sees."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(model_dir), device="cpu")
    return [{"text": t, **clf(t, truncation=True)[0]} for t in texts]


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="runs/pipeline")
    ap.add_argument("--config", help="recipe file with mlm/finetune/evaluate sections")
    ap.add_argument("--demo", action="store_true", help="synthetic data + recipes/demo.yaml (CPU friendly)")
    ap.add_argument("--num_gpus", type=int, default=0, help="ranks per stage (default: all local accelerators, 2 on CPU)")
    ap.add_argument("--overwrite_output_dir", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.output_dir).resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise DaptError(f"output_dir {out} is not empty; pass --overwrite_output_dir to replace it")
    config = args.config or (str(REPO_ROOT / "recipes" / "demo.yaml") if args.demo else None)
    common = ["--config", config] if config else []
    overwrite = ["--overwrite_output_dir"] if args.overwrite_output_dir else []
    data: dict[str, list[str]] = {"mlm": [], "finetune": [], "evaluate": []}
    if args.demo:
        from dapt.demo_data import write_demo_data

        files = write_demo_data(out / "data")
        data = {"mlm": ["--data_files", str(files["unlabelled"])],
                "finetune": ["--data_files", str(files["train"])],
                "evaluate": ["--data_files", str(files["test"])]}
    ranks = args.num_gpus or default_ranks()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One W&B group for the three jobs (when W&B is on; dapt/tracking.py), unless the caller set one.
    os.environ.setdefault("DAPT_WANDB_GROUP", f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    run_stage("mlm.py", ranks, [*common, *data["mlm"], "--output_dir", str(out / "mlm"), *overwrite])
    run_stage("finetune.py", ranks, [*common, *data["finetune"], "--model_name_or_path", str(out / "mlm"),
                                     "--output_dir", str(out / "finetune"), *overwrite])
    run_stage("evaluate.py", ranks, [*common, *data["evaluate"], "--model_name_or_path", str(out / "finetune"),
                                     "--output_dir", str(out), *overwrite])
    results = json.loads((out / "eval_results.json").read_text())
    model_dir = out / "finetune" / "model"
    predictions = predict(model_dir, EXAMPLES)
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    print("\n" + format_table(results))
    for p in predictions:
        print(f"{p['label']:>8} {p['score']:.3f}  {p['text']}")
    print(f"\npipeline finished in {time.perf_counter() - start:.0f}s on {ranks} rank(s)")
    print(f"eval results:    {out / 'eval_results.json'}")
    print(f"exported models: {out / 'mlm' / 'model'} (MLM), {model_dir} (classifier; model card: README.md)")
    from dapt.report import make_report

    print(f"report:          {make_report(out)['markdown']} (plots beside it)")
