"""Training: the trainer and its step, step-indexed randomness, checkpoints shared with the mask
learner, torch.distributed, the exact memory ledger and NVML profiling."""
