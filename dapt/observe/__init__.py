"""Watching a run: metrics log, W&B tracking, progress, throughput (MFU). The report and the sweep summary
that read them are jobs (dapt/jobs/report.py, dapt/jobs/sweep.py)."""
