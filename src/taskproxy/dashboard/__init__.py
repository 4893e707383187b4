"""The dashboard: server-rendered pages at /dashboard over the same report functions as the API
(`views.py`, `data.py`), signed sessions (`session.py`), templates and inline SVG charts; `views.routes`
go into the app's route list."""
