"""Counting what each request cost: `attempts.py` follows each attempt at a provider until it is
recorded once; `meter.py` charges budgets as the provider reports usage; `tokens.py` counts with
tiktoken; `pricing.py` prices with litellm's bundled table; `usage.py` builds the usage event;
`observed.py` is what was read from an answer.
"""
