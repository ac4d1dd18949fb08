"""Watching a run: metrics log, W&B tracking, progress, throughput (MFU), reports and sweep summaries."""
