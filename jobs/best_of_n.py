"""`python -m jobs.best_of_n`: Best-of-N: sample N responses per prompt, keep the one the reward model scores highest, and report

The loop and its config live in :mod:`jobs.drivers.best_of_n`; this module is only the command line.
"""
from jobs.drivers.best_of_n import main

if __name__ == "__main__":
    raise SystemExit(main())
