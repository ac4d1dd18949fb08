"""dapt: domain-adaptive pretraining of BERT on DeepSpeed.

The package follows the pipeline (one level of subpackages):

    config, layout, io, errors, distributed   typed configs, where files go, atomic I/O, exceptions, rendezvous
    data/      sources -> text -> mlm | classify -> batching; prepared (manifest), prepare, demo
    train/     tasks (what a stage gives the loop), trainer (the one loop), checkpoint, engine (DeepSpeed)
    eval/      metrics, scoring (exact, sharded), stats (intervals, tests), evaluate (the job)
    model/     loading, settings (how a model was trained), surgery (speed), export, card
    observe/   metrics_log, tracking (W&B), progress, throughput (MFU), report
    serve/     predict, app (Gradio)
    pipeline   the three jobs chained on one machine
    commands/  one thin main() per command; cli dispatches `dapt <command>` / `python -m dapt`
"""
from dapt.version import __version__

__all__ = ["__version__"]
