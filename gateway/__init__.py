"""mistral-gateway: an OpenAI-compatible gateway that runs the mistral.rs engine on demand."""

__version__ = "0.1.0"
