"""The API dialects the gateway speaks, as peers over the same chat core and serving: OpenAI's (``openai/``),
Anthropic's Messages API (``anthropic/``) and Ollama's API (``ollama/``). Each has its routes (HTTP only: read a
request, describe the model call, hand it to serving) and its pure translation to and from the chat core's shapes;
``errors.py`` writes any error in the shape of the route it happened on."""
