"""Plain torch/transformers code for loading, inspecting and hooking models.

Nothing in this package imports Django: it is used by the task workers, the CLI and the benchmarks
alike.
"""
