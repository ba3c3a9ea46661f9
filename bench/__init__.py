"""Benchmarks that print ratios measured within one run (``python -m bench``, ``make bench``)."""
