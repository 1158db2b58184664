"""The HTTP edge: the server and its defences (``server.py``, ``shutdown.py``), API keys (``auth.py``), trusted proxies
and the public origin (``proxies.py``), request ids, access log and request metrics (``observer.py``), and the OpenAPI
document (``openapi.py``)."""
