"""Data: sources, cleaning and encoding, MLM packing and masking, labels, batching, prepared (tokenised) sets.
Writing a prepared set (`dapt prepare`) is a job: dapt/jobs/prepare.py."""
