"""Benchmarks of pcrjax's training step, evaluation and input pipeline, with a PyTorch twin.

`python -m benchmarks.run` is the one command (benchmarks/README.md). Nothing in pcrjax or its tests
imports this package.
"""
