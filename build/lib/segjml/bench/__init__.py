"""Benchmarks: ``python -m segjml.bench {losses,metrics}``. Each prints ratios against a baseline measured in the
same run, so the numbers compare across machines."""
