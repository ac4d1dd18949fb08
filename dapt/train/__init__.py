"""Training: the Task protocol, the one loop (Trainer), checkpoints, DeepSpeed engine set-up, batch plan, optimizer."""
