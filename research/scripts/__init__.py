"""Scripts that regenerate `results/`; run each from the repository root as `python -m research.scripts.NAME`."""
