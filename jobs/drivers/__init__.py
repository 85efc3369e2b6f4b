"""Driver library: each training job's typed config and its single-controller loop (`train`). The entry points `python -m jobs.<name>` are thin mains over these."""
