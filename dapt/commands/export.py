"""`dapt export` / launch/export.py: any checkpoint -> a Hugging Face model folder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dapt.commands import command
from dapt.config import ExportConfig, parse_config
from dapt.model.export import export_checkpoint, locate_checkpoint


@command
def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ExportConfig, "export", argv)
    out, _ = export_checkpoint(cfg.checkpoint, Path(cfg.output_dir), cfg.overwrite_output_dir)
    print(f"exported {locate_checkpoint(cfg.checkpoint)} -> {out}", flush=True)
    return out
