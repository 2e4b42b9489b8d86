"""Shared pieces of the benchmarks and fault scripts (not a benchmark itself).

`make bench` runs every `bench/*.py`; the helpers live one level down so it
never runs them. Scripts import them as `bench.harness.*` after putting the
repository root on `sys.path` (the first lines of each script).
"""
