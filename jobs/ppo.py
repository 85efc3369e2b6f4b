"""`python -m jobs.ppo`: PPO (RLHF) over the actor fleet: a single controller moving token ids, log-probs and rewards.

The loop and its config live in :mod:`jobs.drivers.ppo`; this module is only the command line.
"""
from jobs.drivers.ppo import main

if __name__ == "__main__":
    raise SystemExit(main())
