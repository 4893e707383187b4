"""Reaching the model providers and relaying their answers.

`provider.py` is the seam (`ProviderClient`): `aiohttp_client.py` in production, `mock.py`'s
`MockProvider` in tests, so both run the same relay code. `translate.py` reaches providers of another
kind through litellm; `relay.py` streams answers to the client as they arrive; `capture.py` keeps
their ends; `sse.py` frames server-sent events; `observe.py` reads usage from each API's answers.
"""
