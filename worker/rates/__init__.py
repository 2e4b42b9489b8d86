"""Live exchange rates (spec §11): the market sources and the refresher that reads them.

A loop of the worker, at the same layer as ingest, outbox and mail (it imports
none of them): it may import `worker.services`, `worker.store`, `worker.domain`
and the leaves `worker.config` and `worker.logs`. Receivers never run it; they
read the table it keeps in Redis (worker/store/rates.py).
"""
