"""Benchmarks: each runs a raw tool and the project's equivalent side by side in one run and prints
medians and ratios. Run all with ``python -m bench`` or one with ``python -m bench.<module>``."""
