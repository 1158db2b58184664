"""The Messages API's routes: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A request is translated into a chat request (``protocol.py``) and handed to serving like any chat request (lazy
start, keep-alive, queueing, the client leaving); errors on these paths are written in Anthropic's shape by the
app's error handlers (gateway/dialects/errors.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ...catalog import CHAT_KINDS, Model
from ...chat import checks
from ...chat.plans import plan_chat
from ...serving.calls import ChatWork, ModelCall
from ...serving.intake import Intake, keep_alive
from ...serving.service import Serving
from . import protocol

MESSAGES = "/v1/messages"


class AnthropicRoutes:
    def __init__(self, intake: Intake, serving: Serving) -> None:
        self._intake = intake
        self._serving = serving

    def routes(self) -> list[BaseRoute]:
        return [
            Route(MESSAGES, self.messages, methods=["POST"]),
            Route(MESSAGES + "/count_tokens", self.count_tokens, methods=["POST"]),
        ]

    def _model(self, request: Request, body: dict[str, Any]) -> Model:
        return self._intake.model(request, body.get("model"), CHAT_KINDS)

    async def messages(self, request: Request) -> Response:
        body = await self._intake.json(request)
        model = self._model(request, body)
        keep = keep_alive(body, request)
        dialect = protocol.Dialect(body, model.id)
        checks.chat(dialect.chat)
        plan = plan_chat(dialect.chat, model.id, takes_images=model.kind == "vision-plain")
        return self._serving.serve(ModelCall(model, keep, ChatWork(plan, dialect, limit="clamp")))

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's tokens as the model sees them (chat template and tools included): the engine has no
        tokenizer route, so it is asked for one token of answer and its usage read."""
        body = await self._intake.json(request)
        model = self._model(request, body)
        keep = keep_alive(body, request)
        chat = protocol.to_chat(body, count_only=True)
        chat.pop("tool_choice", None)  # a forced tool call cannot be made in one token; it does not change the prompt
        checks.chat(chat)
        plan = plan_chat(chat, model.id, takes_images=model.kind == "vision-plain")
        return self._serving.serve(ModelCall(model, keep, ChatWork(plan, protocol.TokenCount(), limit="none")))
