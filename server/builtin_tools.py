"""The built-in tools the server runs for the model inside one response: `python` and `browser`.

A Responses request enables them with `tools: [{"type": "code_interpreter", ...}]` and `[{"type":
"web_search"}]`. The system message then declares them with harmony's own texts (python's with the sandbox's
real timeout, its `/mnt/data` and the network disabled), and when the model addresses `python` or
`browser.search|open|find` the response's loop (`ResponsesService.events`) runs the call here and continues
the turn after the tool's message, as harmony renders it.

State, and who owns it: `BuiltinTools` (one per server, on the event loop) holds the python `SessionPool` (a
session per container id) and the browser backend, and remembers each stored response's `Browser` so that a
response continuing it (`previous_response_id`) sees the same pages under the same cursors. A response gets
its own copy of that browser (`Browser.fork`): two responses continuing one never share pages opened later,
and no browser is ever shared between response chains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tiktoken

from harmony import encoding as tok
from harmony.messages import (
    Author,
    Message,
    Role,
    TextContent,
    ToolNamespaceConfig,
    browser_tool_namespace,
    python_tool_namespace,
)
from harmony.parser import StreamParser
from harmony.render import Renderer
from server.errors import bad_request
from server.protocol import ResponsesTool
from server.settings import ServerSettings
from server.web_search import chat_options, responses_options
from tools.browser.backends import PageFetcher, SearchBackend
from tools.browser.browser import Browser, SearchOptions
from tools.browser.page import TokenCounter
from tools.browser.search_apis import API_KEYS, api_key, make_search_api
from tools.python_sandbox import (
    Limits,
    PythonSandbox,
    SandboxUnavailable,
    SessionPool,
    SessionUnknown,
    new_container_id,
)

logger = logging.getLogger(__name__)

PYTHON = "python"
BROWSER = "browser"
CODE_INTERPRETER_TYPE = "code_interpreter"
# The `tools[].type` values that enable the browser (OpenAI's current name, its preview, and their dated
# aliases).
WEB_SEARCH_TYPES = frozenset(
    {"web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11"}
)
BUILTIN_TYPES = WEB_SEARCH_TYPES | {CODE_INTERPRETER_TYPE}
OUTPUTS_INCLUDE = "code_interpreter_call.outputs"
SOURCES_INCLUDE = "web_search_call.action.sources"
# How many response chains' browsers are remembered for `previous_response_id` (the oldest is forgotten).
REMEMBERED_BROWSERS = 256


def python_namespace(limits: Limits) -> ToolNamespaceConfig:
    """harmony's stateful python text (the one the model was trained on), telling the truth about this
    sandbox: its real timeout, and no internet."""
    namespace = python_tool_namespace()
    assert namespace.description is not None
    text = namespace.description.replace("120.0 seconds", f"{float(limits.wall_seconds):.1f} seconds")
    text = text.replace("UNKNOWN. Depends on the cluster.", "disabled.")
    return dataclasses.replace(namespace, description=text)


@dataclass(frozen=True, slots=True)
class BuiltinRequest:
    """The built-in tools one request enabled."""

    python: bool = False
    browser: bool = False
    # The container the request named (`"container": "cntr_..."`); None for `{"type": "auto"}`.
    container: str | None = None
    # The container of the chain the request continues (`previous_response_id`), if it had one.
    chain_container: str | None = None
    # What the request's `tools` echo in the response, in the order given.
    echo: tuple[dict[str, Any], ...] = ()
    # The web search options (allowed domains, location, context size) the browser honours.
    search: SearchOptions = dataclasses.field(default_factory=SearchOptions)

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset(name for name, on in ((PYTHON, self.python), (BROWSER, self.browser)) if on)


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the model reads (the tool message's text), and what the API's item shows."""

    text: str
    ok: bool
    # code_interpreter_call: the container; web_search_call: the action (search / open_page / find_in_page).
    container_id: str | None = None
    action: dict[str, Any] | None = None


class BuiltinTools:
    """The server's built-in tools: the sandbox's sessions, the browser backend, the chains' browsers.

    Only the event loop calls it, except `parse`, which only reads (`_prepare` runs on a render worker)."""

    def __init__(
        self,
        settings: ServerSettings,
        count_tokens: TokenCounter,
        *,
        backend: SearchBackend | None = None,
        fetcher: PageFetcher | None = None,
    ) -> None:
        self.settings = settings
        self.count_tokens = count_tokens
        self.limits = Limits(
            wall_seconds=settings.python_timeout,
            cpu_seconds=max(1, int(settings.python_timeout)),
            memory_bytes=settings.python_memory_mb << 20,
            processes=settings.python_processes,
            data_bytes=settings.python_data_mb << 20,
        )
        self.pool: SessionPool | None = None
        self.python_unavailable: str | None = "disabled by --python-sandbox off"
        if settings.python_sandbox == "bwrap":
            try:
                sandbox = PythonSandbox(self.limits)
            except SandboxUnavailable as error:
                self.python_unavailable = str(error)
                logger.warning("the python tool is unavailable: %s", error)
            else:
                self.pool = SessionPool(
                    sandbox,
                    max_sessions=settings.python_max_sessions,
                    idle_seconds=settings.python_idle_seconds,
                    max_running=settings.python_max_running,
                )
                self.python_unavailable = None
                logger.info("python tool: bubblewrap sandbox, limits %s", self.limits)
        self._probed = False
        self._probe_lock = threading.Lock()
        self.backend = backend
        self.fetcher = fetcher
        self._browsers: OrderedDict[str, Browser] = OrderedDict()

    def _check_sandbox(self) -> None:
        """Once, for the first request that asks for python: run a probe cell in the sandbox (a binary that
        exists may still be unable to run, where user namespaces are restricted). If it fails, python is
        refused from then on, saying why. On a render worker, never the event loop (`parse`'s caller); the
        requests that come meanwhile wait for the answer."""
        with self._probe_lock:
            if self._probed or self.pool is None:
                return
            self._probed = True
            try:
                seen = asyncio.run(self.pool.sandbox.probe())
            except SandboxUnavailable as error:
                self.python_unavailable = f"the sandbox cannot run here: {error}"
                self.pool = None
                logger.error("the python tool is unavailable: %s", error)
            else:
                logger.info("python sandbox probe: uid and root directory %s", seen)

    def probe_at_start(self) -> None:
        """At the server's start (before it serves): run the sandbox's probe now rather than at the first
        python request, so that the log and `/health` say from the first moment whether python runs, and
        with which limits. Test apps skip it (each probe starts a sandbox)."""
        self._check_sandbox()

    def describe(self) -> dict[str, Any]:
        """What `/health` says of the built-in tools: whether each runs, and the python limits in force."""
        python: dict[str, Any] = {"available": self.pool is not None}
        if self.pool is None:
            python["reason"] = self.python_unavailable
        else:
            python |= {
                "sandbox": "bwrap",
                "sessions": len(self.pool),
                "limits": dataclasses.asdict(self.limits),
            }
        browser = {"available": self.backend is not None, "backend": self.settings.browser_backend}
        return {"python": python, "browser": browser, "max_tool_calls": self.settings.max_builtin_tool_calls}

    # -- requests ------------------------------------------------------------------------------------------

    def parse(self, tools: list[ResponsesTool], chain: list[dict[str, Any]]) -> BuiltinRequest:
        """The built-in tools `tools` enable (a 400 naming the tool for one this server cannot run); `chain`
        is the stored conversation the request continues, whose last container python keeps using."""
        python = browser = False
        container: str | None = None
        search = SearchOptions()
        echo: list[dict[str, Any]] = []
        for i, tool in enumerate(tools):
            if tool.type in WEB_SEARCH_TYPES:
                self._check_browser(f"tools of type {tool.type!r} are", f"tools[{i}].type")
                if browser:
                    raise bad_request("give at most one web_search tool", param=f"tools[{i}].type")
                fields = tool.model_extra or {}
                search = responses_options(fields, f"tools[{i}]", offline=self.offline)
                browser = True
                echo.append({"type": tool.type, **fields})
            elif tool.type == CODE_INTERPRETER_TYPE:
                self._check_sandbox()
                if self.pool is None:
                    raise bad_request(
                        f"code_interpreter is not available on this server: {self.python_unavailable}",
                        param=f"tools[{i}].type",
                    )
                spec = (tool.model_extra or {}).get("container", {"type": "auto"})
                if isinstance(spec, str):
                    if spec not in self.pool:
                        raise bad_request(
                            f"container {spec!r} does not exist (never created, or expired)",
                            param=f"tools[{i}].container",
                        )
                    container = spec
                elif not (isinstance(spec, dict) and spec.get("type") == "auto"):
                    raise bad_request(
                        "container must be a container id or {'type': 'auto'}", param=f"tools[{i}].container"
                    )
                elif spec.get("file_ids"):
                    raise bad_request(
                        "file_ids are not supported: this server has no Files API; write files from python "
                        "into /mnt/data instead",
                        param=f"tools[{i}].container.file_ids",
                    )
                python = True
                echo.append({"type": CODE_INTERPRETER_TYPE, "container": spec})
        chain_container = None
        if python and container is None:
            calls = [item for item in chain if item.get("type") == "code_interpreter_call"]
            chain_container = calls[-1].get("container_id") if calls else None
        return BuiltinRequest(python, browser, container, chain_container, tuple(echo), search)

    def parse_chat(self, web_search_options: Any) -> BuiltinRequest:
        """The browser for a chat request that gave `web_search_options` (a 400 naming the field where this
        server has no browser, or an option it cannot honour)."""
        self._check_browser("web_search_options is", "web_search_options")
        return BuiltinRequest(browser=True, search=chat_options(web_search_options))

    @property
    def offline(self) -> bool:
        """Whether the browser's backend never reaches the web (a local corpus)."""
        return self.settings.browser_backend == "local"

    def _check_browser(self, what: str, param: str) -> None:
        if self.backend is None or self.fetcher is None:
            raise bad_request(
                f"{what} not available: this server has no browser backend (start it with --browser-backend)",
                param=param,
            )

    def namespaces(self, request: BuiltinRequest) -> dict[str, ToolNamespaceConfig]:
        """The system message's tool namespaces for `request`."""
        out: dict[str, ToolNamespaceConfig] = {}
        if request.browser:
            out[BROWSER] = browser_tool_namespace()
        if request.python:
            out[PYTHON] = python_namespace(self.limits)
        return out

    # -- one response's tools ------------------------------------------------------------------------------

    def start(
        self, request: BuiltinRequest, previous_response_id: str | None, *, sources: bool = False
    ) -> ResponseTools:
        """The tools of one response: its container id (chosen now, the session created at the first cell)
        and its browser (a copy of the chain's, if it continues one). With `sources`, a search action lists
        the URLs the search found."""
        container = request.container or request.chain_container or new_container_id()
        browser = None
        if request.browser:
            assert self.backend is not None
            assert self.fetcher is not None
            previous = self._browsers.get(previous_response_id or "")
            browser = (
                previous.fork(request.search)
                if previous is not None
                else Browser(
                    self.backend, self.fetcher, count_tokens=self.count_tokens, options=request.search
                )
            )
        return ResponseTools(self, request, container if request.python else None, browser, sources)

    def remember(self, response_id: str, tools: ResponseTools) -> None:
        """Keep a stored response's browser for responses that continue it."""
        if tools.browser is None:
            return
        self._browsers[response_id] = tools.browser
        self._browsers.move_to_end(response_id)
        while len(self._browsers) > REMEMBERED_BROWSERS:
            self._browsers.popitem(last=False)

    def forget(self, response_id: str) -> None:
        self._browsers.pop(response_id, None)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close_all()


class ResponseTools:
    """The built-in tools of one response being generated (never shared with another)."""

    def __init__(
        self,
        tools: BuiltinTools,
        request: BuiltinRequest,
        container: str | None,
        browser: Browser | None,
        sources: bool = False,
    ) -> None:
        self.tools = tools
        self.request = request
        self.container = container
        self.browser = browser
        self.sources = sources
        self.calls = 0

    def handles(self, recipient: str | None) -> bool:
        return (recipient or "").split(".", 1)[0] in self.request.namespaces

    async def run(self, recipient: str, text: str) -> ToolResult:
        """Run the model's call to `recipient` with its message's text; every failure is a message to the
        model (its item's status says it failed), never an exception."""
        self.calls += 1
        if recipient == PYTHON:
            return await self._python(text)
        return await self._browse(recipient, text)

    async def _python(self, code: str) -> ToolResult:
        pool = self.tools.pool
        assert pool is not None
        assert self.container is not None
        note = ""
        if self.container not in pool:
            if self.container == self.request.container:
                # Named by the request and checked then, it expired since: state is gone, say so.
                note = "[the session had expired: earlier variables and files are gone]\n"
            elif self.container == self.request.chain_container:
                note = "[a new session: the earlier one expired, its variables and files are gone]\n"
            await pool.create(self.container)
        try:
            result = await pool.run(self.container, code)
        except SessionUnknown:  # evicted between create and run by another response's session
            await pool.create(self.container)
            result = await pool.run(self.container, code)
        text = note + result.for_model(pool.sandbox.limits)
        ok = not (result.timed_out or result.truncated)
        return ToolResult(text, ok, container_id=self.container)

    async def _browse(self, recipient: str, arguments: str) -> ToolResult:
        assert self.browser is not None
        function = recipient.removeprefix(BROWSER + ".")
        action = self.action(function, arguments)
        result = await self.browser.call(function, arguments)
        if action["type"] == "open_page" and result.url:
            action["url"] = result.url
        if action["type"] == "search" and self.sources:
            found = self.browser.pages[-1].links.values() if result.ok else []
            action["sources"] = [{"type": "url", "url": url} for url in dict.fromkeys(found)]
        return ToolResult(result.text, result.ok, action=action)

    def action(self, function: str, arguments: str) -> dict[str, Any]:
        """The web_search_call's action for a browser call, as far as its arguments say before it runs."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            args = {}
        if not isinstance(args, dict):
            args = {}
        if function == "search":
            query = args.get("query") if isinstance(args.get("query"), str) else ""
            return {"type": "search", "query": query, "queries": [query]}
        if function == "find":
            pattern = args.get("pattern") if isinstance(args.get("pattern"), str) else ""
            return {"type": "find_in_page", "pattern": pattern, "url": self._page_url(args.get("cursor", -1))}
        target = args.get("id")
        return {"type": "open_page", "url": target if isinstance(target, str) else None}

    def _page_url(self, cursor: Any) -> str:
        assert self.browser is not None
        pages = self.browser.pages
        if not pages:
            return ""
        index = cursor if isinstance(cursor, int) and 0 <= cursor < len(pages) else len(pages) - 1
        return pages[index].url


@dataclass(frozen=True, slots=True)
class ToolExchange:
    """A built-in call the model made and the tool's answer, as the model read them: what a later turn's
    prompt shows again in their place (an API item keeps neither the call's exact arguments nor a page's
    text)."""

    recipient: str  # "python", "browser.search"
    arguments: str  # the call's text: the code, or the JSON arguments
    text: str  # the tool message's text
    channel: str | None = "analysis"
    content_type: str | None = None

    @classmethod
    def of(cls, call: Message, text: str) -> ToolExchange:
        assert call.recipient is not None
        return cls(call.recipient, call.text, text, call.channel, call.content_type)

    def messages(self) -> list[Message]:
        call = Message.from_role(
            Role.ASSISTANT,
            self.arguments,
            channel=self.channel,
            recipient=self.recipient,
            content_type=self.content_type,
        )
        return [call, tool_message(self.recipient, self.channel, self.text)]


def tool_message(recipient: str, channel: str | None, text: str) -> Message:
    """The tool's answer as harmony renders it: from the tool (`python`, `browser.search`) to the assistant,
    on the channel of the call (analysis, as the model calls its built-in tools)."""
    return Message(Author(Role.TOOL, recipient), [TextContent(text)], channel or "analysis", "assistant")


class CallHandler(Protocol):
    """Runs the calls to some recipients: the built-in tools, or a request's MCP servers."""

    def handles(self, recipient: str | None) -> bool: ...


def builtin_call(
    encoding: tiktoken.Encoding, generated: list[int], *handlers: CallHandler | None
) -> Message | None:
    """The server-run tool call an engine request ended on (`<|call|>` closing a message to a recipient one
    of `handlers` runs: `python`, `browser.*`, an MCP server's tool), or None. `generated` is what the
    request produced, after the prompt's `<|start|>assistant`."""
    live = [handler for handler in handlers if handler is not None]
    if not live or not generated or generated[-1] != tok.CALL:
        return None
    parser = StreamParser(encoding, Role.ASSISTANT)
    for token in generated:
        parser.process(token)
    parsed = parser.parsed
    if not parsed or parsed[-1].end_token != tok.CALL:
        return None
    message = parsed[-1].message
    return message if any(handler.handles(message.recipient) for handler in live) else None


def continuation_tokens(
    renderer: Renderer, encoding: tiktoken.Encoding, call: Message, text: str
) -> list[int]:
    """What follows a built-in call in the prompt: the tool's message (`text`) as harmony renders it, then the
    next assistant message's start."""
    assert call.recipient is not None
    message = tool_message(call.recipient, call.channel, text)
    return [*renderer.render_message(message), tok.START, *encoding.encode_ordinary("assistant")]


def settings_problem(settings: ServerSettings) -> str | None:
    """What is wrong with the built-in tools' settings, for the server to refuse to start; None if nothing."""
    if settings.browser_backend == "local":
        if settings.browser_corpus_dir is None:
            return "--browser-backend local needs --browser-corpus-dir"
        if not Path(settings.browser_corpus_dir).is_dir():
            return f"--browser-corpus-dir {settings.browser_corpus_dir!r} is not a directory"
    if settings.browser_backend == "searxng" and settings.searxng_url is None:
        return "--browser-backend searxng needs --searxng-url"
    if settings.browser_backend in API_KEYS and api_key(settings.browser_backend) is None:
        name, variable = settings.browser_backend, API_KEYS[settings.browser_backend]
        return f"--browser-backend {name} needs its API key in the {variable} environment variable"
    return None


def make_builtin_tools(settings: ServerSettings, count_tokens: TokenCounter) -> BuiltinTools:
    """The server's built-in tools as `settings` configure them."""
    problem = settings_problem(settings)
    if problem is not None:
        raise ValueError(problem)
    backend: SearchBackend | None = None
    fetcher: PageFetcher | None = None
    if settings.browser_backend == "local":
        from tools.browser.local_corpus import LocalCorpus

        assert settings.browser_corpus_dir is not None
        corpus = LocalCorpus(settings.browser_corpus_dir)
        backend, fetcher = corpus, corpus
    elif settings.browser_backend == "searxng":
        from tools.browser.fetch import SafeFetcher
        from tools.browser.searxng import SearxngBackend

        assert settings.searxng_url is not None
        backend, fetcher = SearxngBackend(settings.searxng_url), SafeFetcher()
    elif settings.browser_backend in API_KEYS:
        from tools.browser.fetch import SafeFetcher

        backend, fetcher = make_search_api(settings.browser_backend), SafeFetcher()
    return BuiltinTools(settings, count_tokens, backend=backend, fetcher=fetcher)


# The start of a citation mark still being written (`【`, `【3†L`, `【3†L4-L`): held back until it completes.
_PARTIAL_CITATION = re.compile(r"【\d*(?:†(?:L\d*(?:-(?:L\d*)?)?)?)?$")


class Citations:
    """The answer's citation marks (`【cursor†Lx-Ly】`, as the browser's description teaches) rewritten as
    the reference does, ` ([domain](url)) `, with a `url_citation` annotation over each, as the answer
    streams: text from a mark's `【` on is held back until the mark is whole (or cannot be one). Marks that
    cite nothing (an unknown cursor, a search page) stay as written."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.pending = ""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The text that can go out now, and its annotations (indices into that text)."""
        text = self.pending + text
        partial = _PARTIAL_CITATION.search(text)
        ready, self.pending = (text[: partial.start()], text[partial.start() :]) if partial else (text, "")
        cited, found = self.browser.cite(ready)
        annotations = [
            {
                "type": "url_citation",
                "start_index": a.start_index,
                "end_index": a.end_index,
                "url": a.url,
                "title": a.title,
            }
            for a in found
        ]
        return cited, annotations

    def flush(self) -> str:
        """What is held back, as written (the answer ended inside it)."""
        out, self.pending = self.pending, ""
        return out
