"""Tracker webhooks: each tracker (`github.py`, `jira.py`, `linear.py`) verifies its deliveries and
maps them to work-item updates (`base.py`); `registry.py` applies them.
"""
