"""The chat core every dialect shares: requests checked before any engine starts (``checks.py``, ``fields.py``), the
engine requests that answer one client request (``plans.py``), and engine answers and stream events made into OpenAI's
shapes (``answers.py``, ``streams.py``). Pure: no I/O."""
