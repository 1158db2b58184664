"""The bundled engine server: the `mistralrs` package from PyPI behind the engine's own HTTP API.

The PyPI package is the mistral.rs engine with a Python API but no HTTP server and no command line.
This server takes the legacy ``mistralrs-server`` command line (the one the launcher builds), loads
its models, and only then binds its port, so the launcher treats it exactly like the real binary.
Run it as ``python -m gateway.engine.bundled [mistralrs-server arguments]``.
"""
