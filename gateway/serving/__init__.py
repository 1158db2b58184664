"""Serving a model request, whatever its dialect: taking it in (``intake.py``), holding the model's engine for it,
running its engine work and writing the answer (``service.py``, ``chat.py``), through the relay to the engine
(gateway/upstream/)."""
