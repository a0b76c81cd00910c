"""Benchmarks of the two stages (caching, training); run from the repository root as `python -m bench.<name>`."""
