"""The database: tables (`models.py`) and their migrations (`migrations/`, `db.py`), queries
(`repo.py`), the batch writer off the request path (`writer.py`) with its spool (`spool.py`) and bulk
inserts (`bulk.py`), and the usage rollups the reports read (`rollup.py`).
"""
