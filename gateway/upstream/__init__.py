"""The one HTTP path to the engines: the relay (``relay.py``), where engine and transport errors become the gateway's,
over the HTTP client (``client.py``). Below everything that speaks to an engine: serving, the embedding cache, and
the engine pool's launcher and telemetry (their health probes and metrics reads)."""
