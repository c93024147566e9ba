"""What the server is configured with (the engine's own settings live in `model.engine.EngineConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ServerSettings(BaseModel):
    served_model_name: str = "gpt-oss"
    # `Current date:` in the harmony system message: "today" (UTC), a fixed date, or None to leave it out.
    conversation_date: str | None = "today"
    # The system message's reasoning effort when a request names none (the official default).
    default_reasoning_effort: Literal["low", "medium", "high"] = "medium"
    # Sampling defaults when a request leaves them out (gpt-oss's recommended settings).
    default_temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    default_top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Said in /v1/models when the weights are the random demo checkpoint.
    model_note: str | None = None
