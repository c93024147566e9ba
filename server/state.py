"""What the app owns: its settings, encoding and metrics, and, once an engine is attached, the services."""

from __future__ import annotations

import time
from dataclasses import dataclass

import tiktoken

from engine.core import EngineCore
from server.async_engine import AsyncEngine
from server.errors import model_loading
from server.metrics import Metrics
from server.serving import ProcessorsHook, Workers
from server.serving_chat import ChatService
from server.serving_completions import CompletionService
from server.serving_responses import ResponsesService
from server.settings import ServerSettings


@dataclass(slots=True, frozen=True)
class Services:
    """The engine bridge and the serving classes built on it."""

    engine: AsyncEngine
    chat: ChatService
    completions: CompletionService
    responses: ResponsesService


class ServerState:
    """What the routes reach, owned by the app (`app.state.server`); `services` is None until an engine is
    attached, and the model-serving routes answer 503 until then."""

    def __init__(
        self, settings: ServerSettings, encoding: tiktoken.Encoding, processors_hook: ProcessorsHook | None
    ) -> None:
        self.settings = settings
        self.encoding = encoding
        self.processors_hook = processors_hook
        self.created = int(time.time())
        self.workers = Workers(settings.render_workers)
        self.workers.warm_up(lambda: encoding.encode_ordinary("warm up"))
        self.services: Services | None = None
        self.metrics = Metrics(lambda: self.services.engine.engine if self.services is not None else None)

    def attach(self, engine: EngineCore) -> None:
        bound = engine.config.max_num_seqs + self.settings.max_waiting_requests
        share = self.settings.max_in_flight_per_client
        bridge = AsyncEngine(
            engine,
            max_in_flight=bound,
            max_in_flight_per_client=max(1, bound // 2) if share is None else share,
            max_unread_outputs=self.settings.max_unread_outputs,
            on_finished=lambda p, o, ttft, e2e: self.metrics.observe_request(
                prompt_tokens=p, output_tokens=o, ttft=ttft, e2e=e2e
            ),
        )
        shared = (
            bridge,
            self.encoding,
            self.settings,
            engine.max_model_len,
            self.workers,
            self.processors_hook,
        )
        anomalies = self.metrics.parse_anomalies.inc
        responses = ResponsesService(*shared, on_anomalies=anomalies)
        # One set of built-in tools (python sessions, the browser backend) serves both APIs.
        chat = ChatService(*shared, builtin=responses.builtin, on_anomalies=anomalies)
        self.services = Services(bridge, chat, CompletionService(*shared), responses)

    def ready(self) -> Services:
        """The services, or a 503 `model_loading` while no engine is attached."""
        if self.services is None:
            raise model_loading()
        return self.services
