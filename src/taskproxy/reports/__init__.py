"""Reading usage against work: per task (`usage.py`, `items.py`), adoption against completed work
(`adoption.py` over `adoption_data.py`, exported by `adoption_export.py`) and the gaming signals
(`signals.py` over `signal_data.py`, `signal_checks.py` and `signal_cadence.py`). Pure queries and arithmetic: the API, the
CLI and the dashboard all call these.
"""
