"""`python -m jobs.dpo`: Direct Preference Optimization (and its variants) over the actor fleet.

The loop and its config live in :mod:`jobs.drivers.dpo`; this module is only the command line.
"""
from jobs.drivers.dpo import main

if __name__ == "__main__":
    raise SystemExit(main())
