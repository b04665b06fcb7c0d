"""Benchmarks of the cnn-codes service against the hardware limit and common alternatives.

Run with ``make bench`` (``python -m bench.run``); results land in ``bench/results/``.
Nothing here is part of the test suite.
"""
