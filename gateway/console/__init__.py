"""The operator's console: its page (``ui/``) and routes (``routes.py``), the model requests it lists and cancels
(``tracker.py``), and the engines' output it shows (``engine_logs.py``)."""
