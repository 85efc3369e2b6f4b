"""Pure math of alignment: batches, log-probs, DPO-family losses, PPO math, Best-of-N.

Imports only torch, numpy and the standard library: no Ray, no transformers, no workers,
so every function here is tested exactly against hand-computed values.
"""
