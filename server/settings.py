"""What the server is configured with (the engine's own settings live in `engine.config.EngineConfig`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

Effort = Literal["low", "medium", "high"]


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
    # Required as `Authorization: Bearer ...` on every route but /health when set; /metrics too when
    # `metrics_access` is "protected" (by default it stays open for Prometheus: it holds counts only).
    api_key: str | None = None
    metrics_access: Literal["public", "protected"] = "public"
    # Seconds a stream may run on after SIGTERM before it is cancelled.
    shutdown_grace: float = Field(default=30.0, ge=0.0)
    # Origins browsers may call from (CORS); empty: no CORS headers.
    cors_origins: list[str] = Field(default_factory=list)
    # The chat page at `/` (`server.page`); off for API-only deployments.
    chat_page: bool = True
    # Limits, each refused with a clear error: request body bytes (413), messages or input items and tools
    # per request (400), and requests queued beyond the running batch (429 with Retry-After).
    max_request_bytes: int = Field(default=16 << 20, ge=1)
    max_messages: int = Field(default=2048, ge=1)
    max_tools: int = Field(default=256, ge=0)
    max_waiting_requests: int = Field(default=512, ge=0)
    # Requests (sequences) one client may have in flight, of the bound above plus the running batch: beyond it
    # that client gets a 429 while the others are still served. None: half the bound. A client is the value of
    # `client_id_header` when set and sent (behind a proxy: the header it sets), else the peer's address.
    max_in_flight_per_client: int | None = Field(default=None, ge=1)
    client_id_header: str | None = None
    # Characters of text a prompt may have (a chat's messages and tools, a completion's prompts); refused with
    # a 400 before tokenizing. Twice the longest context at about 4 characters a token, with room to spare.
    max_prompt_chars: int = Field(default=1 << 20, ge=1)
    # Engine sequences one request may ask for (prompts x n): a 400 beyond it, before any tokenizing.
    max_sequences_per_request: int = Field(default=256, ge=1)
    # Outputs (about one per token) a request's client may leave unread before the request is aborted.
    max_unread_outputs: int = Field(default=4096, ge=1)
    # Seconds a client may take to send a request's headers (`server.transport`), and again its body.
    request_read_timeout: float = Field(default=30.0, gt=0)
    # A request field no request model declares: refused with a 400 naming it (False), or logged, ignored and
    # named in the `x-ignored-fields` response header (True), for a client that sends fields of another API.
    ignore_unknown_fields: bool = False
    # Threads that render and tokenize requests, off the event loop.
    render_workers: int = Field(default=4, ge=1)
    # The built-in tools (Responses `code_interpreter` and `web_search`), run by the server. The python tool
    # runs in a bubblewrap sandbox ("off": refused); its limits per cell and per session are these.
    python_sandbox: Literal["bwrap", "off"] = "bwrap"
    python_timeout: float = Field(default=30.0, gt=0)
    python_memory_mb: int = Field(default=1024, ge=64)
    python_processes: int = Field(default=64, ge=1)
    python_data_mb: int = Field(default=256, ge=1)
    python_max_sessions: int = Field(default=32, ge=1)
    python_idle_seconds: float = Field(default=1200.0, gt=0)
    python_max_running: int = Field(default=8, ge=1)
    # The browser's backend: a local corpus directory (searched and opened offline), a SearXNG instance or a
    # hosted search API (Exa, Brave, You.com, each with its key from the environment: `search_apis.API_KEYS`;
    # pages then fetched from the web behind the SSRF guard), or none (web_search refused).
    browser_backend: Literal["local", "searxng", "exa", "brave", "you"] | None = None
    browser_corpus_dir: str | None = None
    searxng_url: str | None = None
    # Remote MCP servers (Responses `{"type": "mcp"}` tools) pass the browser's SSRF guard: public addresses
    # only, unless inside one of these networks (CIDR, e.g. "10.0.0.0/8" for an intranet server; any port).
    mcp_allow: list[str] = Field(default_factory=list)
    # Seconds one MCP list or call may take.
    mcp_timeout: float = Field(default=30.0, gt=0)
    # Built-in tool calls one response may run before it ends as incomplete (reason "max_tool_calls"); a
    # request's `max_tool_calls` may lower it.
    max_builtin_tool_calls: int = Field(default=20, ge=1)
    # The most tokens a turn's reasoning may take when a request names no `thinking_token_budget` (None: no
    # bound); past it the grammar closes the analysis and opens the answer.
    thinking_token_budget: int | None = Field(default=None, ge=0)
    # The same per reasoning effort (the request's, or default_reasoning_effort): an effort named here takes
    # its budget from here, the others from thinking_token_budget.
    thinking_token_budget_by_effort: dict[Effort, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    # A short sentence written into the analysis, on a line of its own, when it runs to its budget, before
    # the grammar closes it (None: the analysis is closed as it stands).
    thinking_budget_closing: str | None = Field(default=None, min_length=1, max_length=200)
    # Seconds a request's grammar may take to compile before the request is refused with a 400.
    grammar_compile_timeout: float = Field(default=2.0, gt=0)

    @field_validator("mcp_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as error:
                raise ValueError(f"--mcp-allow: {net!r} is not a network (e.g. 10.0.0.0/8)") from error
        return value
