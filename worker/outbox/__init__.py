"""Merchant callbacks: the delivery outbox, its loop with retries (`delivery`), and their
signatures (`webhooks`: AlphaPo headers, optionally Standard Webhooks).

May import `worker.services` and below; not `ingest`, `mail` or `app`.
"""
