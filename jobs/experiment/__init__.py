"""The comparison experiment: preference-data stage, evaluation, statistics, report."""
