"""The publisher's guarded-job service: job spec, policy, LoRA wiring, planning, running, signing,
the hash-chained job log and delta merging."""
