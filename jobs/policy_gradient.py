"""`python -m jobs.policy_gradient`: critic-free RL (RLOO, GRPO, Dr. GRPO, REINFORCE++) over the actor fleet.

The loop and its config live in :mod:`jobs.drivers.policy_gradient`; this module is only the command line.
"""
from jobs.drivers.policy_gradient import main

if __name__ == "__main__":
    raise SystemExit(main())
