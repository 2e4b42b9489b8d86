"""The shell around the pure state machine: load, apply, commit with compare-and-set
(`invoices`), and the operator's read views (`operations`).

May import `worker.store`, `worker.domain`, `worker.config`, `worker.logs`.
"""
