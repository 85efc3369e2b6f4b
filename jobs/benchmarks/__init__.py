"""Benchmarks behind `python -m jobs.bench`."""
