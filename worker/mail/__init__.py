"""Customer e-mails: the loop that claims, sends and records them (`loop`), rendering from
`templates/` (`render`), SMTP or Maildir (`transport`). The records themselves are
`worker.store.mails`.

May import `worker.services` and below; not `ingest`, `outbox` or `app`.
"""
