"""Fault runs: scripted failures under load, checked against the reference model.

Each module is a script (`.venv/bin/python bench/faults/<name>.py`) that
prints what was sent, acknowledged, applied and delivered as one JSON object
and exits 1 on any loss or double effect; tests/test_faults.py calls the same
`run` functions with smaller sizes. `make faults` runs all of them.
"""
