"""The Redis records: invoices, merchants, mails, addresses, every key name (`keys`), the
stored formats (`codec`), the Lua scripts and their typed wrappers, the client
settings (`connection`) and the local redis-server runner.

Every check-then-write is one Lua script. May import `worker.domain`, `worker.config`
and `worker.logs`; nothing above. Code outside `worker` reaches Redis through the
functions here or in `worker.services`, never by naming a key.
"""
