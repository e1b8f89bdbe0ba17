"""Measuring models as deployed: robustness under attack (targets, suite, run, report, api) and speed (bench)."""
