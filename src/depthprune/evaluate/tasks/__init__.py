"""The evaluation tasks, one module each; each registers itself in ``depthprune.evaluate.EVAL_TASKS`` when imported."""
