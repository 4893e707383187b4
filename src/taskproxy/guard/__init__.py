"""What decides whether a request goes upstream, from views kept in memory so the request path never
waits for the database: keys (`auth.py`), the work item it belongs to (`attribution.py`), body limits
(`body.py`), rate limits (`ratelimit.py`), the work-item policy (`items.py`), budgets (`budgets.py`),
who created a stored response (`response_origins.py`: read back or continued by that person only);
`reload.py` refreshes those views on a timer; `lookups.py` bounds the reads of what is not in memory;
`per_key.py` counts what each key has under way (self-service calls, open sockets).
"""
