"""The invoice domain, pure: models, events and effects, the state machine, money,
currencies and quotes, the merchant snapshot, request signatures, address derivation
and validation.

No I/O lives here: no Redis, no aiohttp, no clock (time comes in on events), so
everything here is tested without a server. It imports nothing of coinvoice outside
`worker.domain` (`make lint` enforces it).
"""
