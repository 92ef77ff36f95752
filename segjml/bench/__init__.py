"""Benchmarks: ``python -m segjml.bench {losses,metrics,data,trainer,train}``. Each prints ratios against a baseline
measured in the same run, so the numbers compare across machines."""
