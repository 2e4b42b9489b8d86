"""coinvoice worker: the invoice domain, its Redis store, the loops that apply updates and
deliver callbacks and e-mails, and the arq worker that runs them.

Layers, each importing only the ones below it (`make lint` checks this with
import-linter): `app` (wiring, the arq worker) → `ingest`, `outbox`, `mail` (the
loops, independent of each other) → `services` (the shell around the state
machine) → `store` (Redis) → `domain` (pure). `config` (settings) and `logs`
(structlog set-up) are leaves any layer may import; they import nothing of coinvoice.
"""
