"""The dashboard (DESIGN §10): server-rendered pages at /dashboard; `routes` go into the app's route list."""

from taskproxy.dashboard.views import routes

__all__ = ["routes"]
