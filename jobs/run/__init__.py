"""Run machinery shared by every driver: config, cluster, checkpoints, faults, metrics, step plans, tokenising, reference cache."""
