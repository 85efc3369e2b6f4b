"""`python -m jobs.sft`: Supervised fine-tuning on response tokens only: the SFT starting policy and the Preferred-FT baseline.

The loop and its config live in :mod:`jobs.drivers.sft`; this module is only the command line.
"""
from jobs.drivers.sft import main

if __name__ == "__main__":
    raise SystemExit(main())
