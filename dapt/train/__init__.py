"""Training's building blocks: the Task protocol, checkpoints, DeepSpeed engine set-up, batch plan, optimizer.
The one loop that uses them (Trainer) is a job: dapt/jobs/trainer.py."""
