"""dapt: domain-adaptive pretraining of BERT on DeepSpeed.

The modules follow the pipeline: config -> distributed -> data -> (mlm | finetune) via training ->
evaluation (metrics) -> export.
"""
from dapt.version import __version__

__all__ = ["__version__"]
