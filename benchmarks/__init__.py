"""Benchmarks of cna-export: run each from the repository root as `python -m benchmarks.NAME` (see its docstring);
they import the package only. Raw numbers go to benchmarks/results/."""
