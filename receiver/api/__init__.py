"""The JSON API: merchant (signed), public (the customer's page, token in the URL) and
processing callbacks; reading and validating requests in the order of spec §6
(`requests`, `schemas`), the error bodies and their middleware (`errors`), the views
of an invoice, rate limits, the stream appends, and the OpenAPI document.

May import `receiver.appkeys`/`accesslog` and the worker; not `pages` or `commands`.
"""
