"""Learning a guard: the bilevel FreezeAsGuard mask learner over flat fp32 buffers, its config,
the pipeline from a model folder to a manifest, baselines and reports."""
