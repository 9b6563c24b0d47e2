"""The selection criteria, one module each; each registers itself in ``depthprune.select.CRITERIA`` when imported."""
