"""Modules of benchmarks/quality_bench.py: conversation splits, the trained target, vLLM acceptance."""
