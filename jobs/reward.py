"""`python -m jobs.reward`: Bradley-Terry reward model: an LM backbone with a scalar head read at the last response token.

The loop and its config live in :mod:`jobs.drivers.reward`; this module is only the command line.
"""
from jobs.drivers.reward import main

if __name__ == "__main__":
    raise SystemExit(main())
