"""coinvoice worker: the invoice domain, its Redis store and the arq worker."""
