"""The `coinvoice` console script and the operator's commands: `cli` parses, `up` runs
everything on one machine, `simulate` plays the processing layer, `operator` prints
the operator views.

The top of the receiver: may import everything else of it and the worker.
"""
