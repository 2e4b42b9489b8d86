"""Wiring: building the shared services from the settings (`runtime`) and the arq worker
with its loops, cron jobs and health check (`main`). The top of the worker; may import
every worker layer.
"""
