"""The customer's hosted pages (spec §7): handlers, Jinja templates and static files.

May import `receiver.api` (request reading, errors, views) and the worker.
"""
