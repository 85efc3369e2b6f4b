"""`python -m jobs.compare`: The head-to-head experiment: RLHF (PPO) vs DPO and baselines on the same data, and its report.

The loop and its config live in :mod:`jobs.drivers.compare`; this module is only the command line.
"""
from jobs.drivers.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
