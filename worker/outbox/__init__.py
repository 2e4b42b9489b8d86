"""Merchant callbacks: the delivery outbox, its loop with retries (`delivery`), and their
signatures (`webhooks`: AlphaPo headers, optionally Standard Webhooks), where they may
go (`destinations`: the SSRF guard) and the HTTP client that posts them (`http`).

May import `worker.services` and below; not `ingest`, `mail` or `app`.
"""
