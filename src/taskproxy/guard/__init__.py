"""What decides whether a request goes upstream, from views kept in memory so the request path never
waits for the database: keys (`auth.py`), the work item it belongs to (`attribution.py`), body limits
(`body.py`), rate limits (`ratelimit.py`), the work-item policy (`items.py`), budgets (`budgets.py`);
`reload.py` refreshes those views on a timer.
"""
