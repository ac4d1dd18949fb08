"""A training run's record on rank 0: `metrics.jsonl`, the console (bar or lines) and W&B, in one place.

Every record (one per logging step, one per evaluation) goes to all three; W&B gets exactly what the
local file holds. On other ranks the log is inert.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from dapt.io import append_jsonl, read_jsonl, write_jsonl
from dapt.layout import StageLayout
from dapt.observe.progress import Progress
from dapt.observe.tracking import WandbRun, resolve_wandb_mode, start_wandb, wandb_group


class MetricsLog:
    def __init__(self, path: Path | None, wandb: WandbRun | None = None, progress: Progress | None = None):
        self.path = path
        self.wandb = wandb or WandbRun(None)
        self.progress = progress

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the interrupted run took after its last checkpoint."""
        if self.path is not None and self.path.exists():
            write_jsonl([r for r in read_jsonl(self.path) if r["step"] <= step], self.path)

    def write(self, record: dict[str, Any], line: str) -> None:
        if self.path is None:
            return
        append_jsonl(record, self.path)
        self.wandb.log(record)
        if self.progress is not None:
            self.progress.write(record, line)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.advance(step)

    def finish(self, summary: Mapping[str, Any] | None = None, preempted: bool = False) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if summary:
            flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
            flat.update({f"final_{k}": v for k, v in (summary.get("final_eval") or {}).items() if k != "step"})
            self.wandb.summary(flat)
        self.wandb.finish(preempted=preempted)


def open_metrics_log(cfg: Any, layout: StageLayout, stage: str, run_config: Mapping[str, Any], resumed: bool,
                     total_steps: int, initial_step: int) -> MetricsLog:
    """Rank 0 of a training stage: metrics.jsonl, W&B (per cfg.wandb_*, with the resolved config) and progress."""
    mode = resolve_wandb_mode(cfg.wandb_mode)
    group = wandb_group(cfg.wandb_group)
    run = start_wandb(mode, project=cfg.wandb_project, group=group,
                      name=cfg.wandb_name or f"{stage}-{layout.root.resolve().name}",
                      job_type=stage, config=run_config, output_dir=layout.root, resume=resumed)
    if mode != "disabled" and run.id:
        where = os.environ.get("WANDB_DIR") or str(layout.root)
        print(f"[{stage}] W&B {mode} run {run.id}" + (f" (group {group})" if group else "")
              + (f"; sync later: wandb sync {where}/wandb/offline-run-*-{run.id}" if mode == "offline" else ""),
              flush=True)
    return MetricsLog(layout.metrics, run, Progress(total_steps, initial_step, cfg.progress))
