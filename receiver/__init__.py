"""coinvoice receiver: the HTTP edge and the `coinvoice` command line.

`app`, `routes`, `appkeys`, `accesslog`, `health` and `metrics` build the aiohttp
application; `api` holds the JSON endpoints, `pages` the hosted pages, `commands` the
operator's commands. It imports the worker's `app`, `services`, `store` and `domain`
functions, and never names a Redis key or a stored format (`worker.store.keys`,
`codec`, `scripts` are off limits; `make lint` checks it). The worker never imports
the receiver.
"""
