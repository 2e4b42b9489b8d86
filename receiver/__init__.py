"""coinvoice receiver: the HTTP edge (merchant API, processing callbacks, pages) and the CLI."""
