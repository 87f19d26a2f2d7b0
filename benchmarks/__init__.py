"""Benchmarks: `python -m benchmarks.extraction` (activation extraction) and
`python -m benchmarks.web` (pages, query counts, progress delay). Each prints one JSON line last."""
