"""Data: sources, cleaning and encoding, MLM packing and masking, labels, batching, prepared (tokenised) sets."""
