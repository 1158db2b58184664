"""Several gateways behind a router: what each node serves, and the configuration each router needs for them
(``mistral-gateway routers ...``; docs/scale-out.md)."""
