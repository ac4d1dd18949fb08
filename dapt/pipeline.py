"""The whole pipeline on one machine: MLM -> fine-tune -> evaluate -> export -> predict -> report.

Each stage runs as its own job under the `deepspeed` launcher (as on a cluster, where each is an
sbatch job), on every local accelerator, or on 2 CPU ranks when there is none. The directory layout
is dapt/layout.py's RunLayout, the same as slurm/pipeline.sh's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from deepspeed.accelerator import get_accelerator

from dapt.config import REPO_ROOT
from dapt.data.demo import write_demo_data
from dapt.distributed import free_port
from dapt.errors import DaptError
from dapt.eval.metrics import format_table
from dapt.io import read_json, write_jsonl
from dapt.layout import RunLayout
from dapt.observe.report import make_report

EXAMPLES = [
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
]


def default_ranks() -> int:
    acc = get_accelerator()
    return 2 if acc.device_name() == "cpu" else max(1, acc.device_count())


def deepspeed_command(script: str, ranks: int) -> list[str]:
    """`deepspeed --num_gpus N --master_port <free port> launch/<script>`, with the launcher beside
    this interpreter (a venv), else the one on PATH."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO_ROOT / "launch" / script)]


def run_job(script: str, ranks: int, args: list[str]) -> None:
    cmd = [*deepspeed_command(script, ranks), *args]
    print(f"\n==> {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    if proc.returncode:
        raise DaptError(f"{script} failed with exit code {proc.returncode}")


def predict_examples(model_dir: Path, texts: Sequence[str]) -> list[dict]:
    """The exported folder through the stock transformers pipeline: what a user of the model sees."""
    from transformers import pipeline  # only here: the stages themselves do not need it in this process

    clf = pipeline("text-classification", model=str(model_dir), device="cpu")
    return [{"text": t, **clf(t, truncation=True)[0]} for t in texts]


def run_pipeline(root: Path, config: str | None, demo: bool, ranks: int, overwrite: bool) -> dict:
    """Run the three jobs into `root` (RunLayout) and return the evaluation results."""
    run = RunLayout(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DaptError(f"output_dir {root} is not empty; pass --overwrite_output_dir to replace it")
    common = ["--config", config] if config else []
    again = ["--overwrite_output_dir"] if overwrite else []
    data: dict[str, list[str]] = {"mlm": [], "finetune": [], "evaluate": []}
    if demo:
        files = write_demo_data(run.data)
        data = {"mlm": ["--data_files", str(files["unlabelled"])], "finetune": ["--data_files", str(files["train"])],
                "evaluate": ["--data_files", str(files["test"])]}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One W&B group for the three jobs (when W&B is on; dapt/observe/tracking.py), unless the caller set one.
    os.environ.setdefault("DAPT_WANDB_GROUP", f"{root.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    run_job("mlm.py", ranks, [*common, *data["mlm"], "--output_dir", str(run.mlm.root), *again])
    run_job("finetune.py", ranks, [*common, *data["finetune"], "--model_name_or_path", str(run.mlm.root),
                                   "--output_dir", str(run.finetune.root), *again])
    run_job("evaluate.py", ranks, [*common, *data["evaluate"], "--model_name_or_path", str(run.finetune.root),
                                   "--output_dir", str(run.eval.root), *again])
    results = read_json(run.eval.results)
    examples = predict_examples(run.finetune.model, EXAMPLES)
    write_jsonl(examples, run.examples)
    print("\n" + format_table(results))
    for p in examples:
        print(f"{p['label']:>8} {p['score']:.3f}  {p['text']}")
    print(f"\npipeline finished in {time.perf_counter() - start:.0f}s on {ranks} rank(s)")
    print(f"eval results:    {run.eval.results}")
    print(f"exported models: {run.mlm.model} (MLM), {run.finetune.model} (classifier; model card: README.md)")
    print(f"report:          {make_report(root)['markdown']} (plots beside it)")
    return results
