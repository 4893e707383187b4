"""taskproxy: an OpenAI-compatible proxy that only forwards requests linked to a work item."""

__version__ = "0.1.0"
