"""The HTTP surface: each module is one family of routes, and reads what it uses from the lifespan's
state (`request.state`).

- `openai.py`, `anthropic.py`: the proxied endpoints, each declared as an `Endpoint` (`endpoint.py`);
- `admission.py`: admitting a proxied request, in the contract's order; `proxy.py`: the flow every
  proxied endpoint shares (admit, forward with fallbacks, answer, record each attempt once);
- `admin.py`, `me.py`, `reports.py`, `signals.py`, `webhooks.py`, `metrics.py`, `openapi.py`: the
  admin and self-service API, tracker webhooks, Prometheus metrics and the API's description;
- `common.py`: what the JSON routes share (bodies, query parameters, the admin check).
"""
