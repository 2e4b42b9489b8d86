"""Processing updates: appending them to the Redis stream (`enqueue`) and the batch
consumer that applies them exactly once (`consumer`).

May import `worker.services` and below; not `outbox`, `mail` or `app`.
"""
