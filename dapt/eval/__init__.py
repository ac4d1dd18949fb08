"""Evaluation's building blocks: scoring (a model over a batched set, every example once), metrics and
their uncertainty. The evaluation job is dapt/jobs/evaluate.py."""
