"""Benchmarks of the course: each ``benchmarks/NAME.py`` runs one study and writes
``benchmarks/results/NAME.json`` (run ``python benchmarks/NAME.py --help``)."""
