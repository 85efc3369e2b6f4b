"""`python -m jobs.online_dpo`: online (iterative) DPO on the policy's own samples over the actor fleet.

The loop and its config live in :mod:`jobs.drivers.online_dpo`; this module is only the command line.
"""
from jobs.drivers.online_dpo import main

if __name__ == "__main__":
    raise SystemExit(main())
