"""Tracker webhooks: each tracker verifies its deliveries and maps them to work-item updates."""
