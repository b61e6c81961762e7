"""Benchmarks of the assessment scores against ground truths (SPEC 6)."""
