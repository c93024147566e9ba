"""Remote MCP servers as the model's tools, in the Responses API: `tools: [{"type": "mcp", "server_label",
"server_url", "headers", "allowed_tools", "require_approval"}]`.

Before a request is rendered (`McpTools.ready`, on the event loop) each server's tools are listed, or taken
from the `mcp_list_tools` item of the chain the request continues (as OpenAI does: a listing in the context
is not fetched again). They are declared in the system message as a namespace named by the server's label,
as harmony declares the built-in `browser`, so the model calls `<server_label>.<tool>`; the response's tool
loop runs such a call like a built-in one (`McpResponse.run`), its `mcp_call` item streaming as it is written.

A tool that needs approval (`require_approval`: "always", the default as with OpenAI, "never", or the filter
object) is not called: the response ends with an `mcp_approval_request` item. A request continuing it
(`previous_response_id`) with an `mcp_approval_response` input item runs the call (or tells the model it was
refused) once every check that can refuse the request has passed (`McpTools.ready` checks the answers,
`McpTools.carry_out` runs them), and the prompt then holds the call and its result as harmony renders them,
so the model picks up where it stopped.

Every call, the model's own and the answered ones, is kept with the response as a `ToolExchange` (by the
`mcp_call` item's id; an answered one also by its approval request's id, as a refused one has no item), so a
later turn's prompt shows it again as harmony renders the conversation: the call on the commentary channel to
`<label>.<tool>`, then the tool's message; an answered call where its answer is, in the order the answers
came. An `mcp_call` item a client sends back is shown from its arguments and output.

A server that cannot be listed fails the request with a 424 (OpenAI's status for it); one the SSRF guard
refuses, a 400 naming its `server_url`. A failed call is an `mcp_call` item with an `error`, and the model
reads what went wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from harmony.messages import ToolDescription, ToolNamespaceConfig
from harmony.schema import json_schema_to_typescript
from server.builtin_tools import ToolExchange
from server.errors import APIError, bad_request
from server.protocol import ResponsesInputItem, ResponsesTool
from server.settings import ServerSettings
from tools.mcp_client import McpConnector, McpFailure, McpPolicy, McpTool

logger = logging.getLogger(__name__)

MCP_TYPE = "mcp"
# The items of MCP traffic a conversation may hold besides its calls (`mcp_call`, shown from their exchange):
# the chat messages it becomes leave them out.
MCP_ITEM_TYPES = frozenset({"mcp_list_tools", "mcp_approval_request", "mcp_approval_response"})
# How the model writes a call to an MCP tool (its arguments are JSON), as an approved call is shown.
CALL_CHANNEL, CALL_CONTENT_TYPE = "commentary", "<|constrain|>json"
# Labels that would collide with a namespace harmony or this server already uses.
RESERVED_LABELS = frozenset(
    {"functions", "browser", "python", "container", "assistant", "user", "system", "developer", "tool", "all"}
)
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# A tool name that can stand in a harmony recipient and a TypeScript declaration (MCP's own naming rule).
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# A tool filter: (tool names, or None for any), (read-only hint it must have, or None for any).
ToolFilter = tuple[frozenset[str] | None, bool | None]


def _filter(value: Any, param: str) -> ToolFilter:
    """A tool filter (`{"tool_names": [...], "read_only": bool}`) as (names or None, read_only or None)."""
    if not isinstance(value, dict):
        raise bad_request("a tool filter is an object with tool_names and/or read_only", param=param)
    names = value.get("tool_names")
    read_only = value.get("read_only")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad_request("tool_names must be a list of tool names", param=f"{param}.tool_names")
    if read_only is not None and not isinstance(read_only, bool):
        raise bad_request("read_only must be true or false", param=f"{param}.read_only")
    return (frozenset(names) if names is not None else None), read_only


def _matches(rule: ToolFilter, tool: McpTool) -> bool:
    names, read_only = rule
    if names is None and read_only is None:
        return False
    return (names is None or tool.name in names) and (read_only is None or tool.read_only == read_only)


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """One `{"type": "mcp"}` tool of a request, checked."""

    label: str
    url: str
    headers: dict[str, str]
    # `allowed_tools`: a list of names or a filter; None: every tool the server lists.
    allowed: ToolFilter | None
    # `require_approval`: "always", "never", or the filter object's (always, never) rules.
    approval: str | tuple[ToolFilter, ToolFilter]
    param: str
    # What the response's `tools` echo (the headers left out: they may hold credentials).
    echo: dict[str, Any]

    def allows(self, tool: McpTool) -> bool:
        return self.allowed is None or _matches(self.allowed, tool)

    def needs_approval(self, tool: McpTool) -> bool:
        if isinstance(self.approval, str):
            return self.approval == "always"
        always, never = self.approval
        if _matches(always, tool):
            return True
        return not _matches(never, tool)


@dataclass(frozen=True, slots=True)
class McpServer:
    """A server's tools for one request: those the request allows, and the `mcp_list_tools` item to add to
    the output (None when the listing came from the chain)."""

    spec: McpServerSpec
    tools: dict[str, McpTool]
    listed: dict[str, Any] | None

    def namespace(self) -> ToolNamespaceConfig:
        return ToolNamespaceConfig(
            self.spec.label,
            None,
            [ToolDescription(t.name, t.description, t.input_schema) for t in self.tools.values()],
        )


@dataclass(frozen=True, slots=True)
class ApprovedCall:
    """A call the client answered (`mcp_approval_response`), carried out: the call and the tool's message go
    into the prompt, the `mcp_call` item (None when refused) into the output."""

    exchange: ToolExchange
    request_id: str
    item: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ApprovalAnswer:
    """An `mcp_approval_response` checked but not yet carried out: the call it answers (its answer's text
    still empty), and what carries it out, run only once nothing can refuse the request any more."""

    call: ToolExchange
    carry_out: Callable[[], Awaitable[ApprovedCall]]


@dataclass(frozen=True, slots=True)
class McpRequest:
    servers: dict[str, McpServer] = field(default_factory=dict)
    # The request's answers to approval requests, in input order: checked (`answers`), then carried out.
    answers: tuple[ApprovalAnswer, ...] = ()
    approved: tuple[ApprovedCall, ...] = ()

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(self.servers)

    def namespaces(self) -> dict[str, ToolNamespaceConfig]:
        return {label: server.namespace() for label, server in self.servers.items()}

    @property
    def echo(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(server.spec.echo) for server in self.servers.values()]


def mcp_call_item(
    server_label: str, name: str, arguments: str = "", approval: str | None = None
) -> dict[str, Any]:
    return {
        "id": "mcp_" + secrets.token_hex(12),
        "type": "mcp_call",
        "server_label": server_label,
        "name": name,
        "arguments": arguments,
        "approval_request_id": approval,
        "output": None,
        "error": None,
        "status": "in_progress",
    }


class McpTools:
    """The server's MCP client side: the SSRF policy (`--mcp-allow`) and the connector. Stateless across
    requests: what a chain listed lives in its stored items."""

    def __init__(self, settings: ServerSettings, connector: McpConnector | None = None) -> None:
        networks = tuple(ipaddress.ip_network(net, strict=False) for net in settings.mcp_allow)
        self.connector = connector or McpConnector(
            McpPolicy(allowed_networks=networks, timeout_s=settings.mcp_timeout)
        )

    def specs(self, tools: list[ResponsesTool]) -> list[McpServerSpec]:
        """The request's MCP servers, checked (a 400 naming the field for anything wrong)."""
        out: list[McpServerSpec] = []
        for i, tool in enumerate(tools):
            if tool.type != MCP_TYPE:
                continue
            param = f"tools[{i}]"
            extra = tool.model_extra or {}
            label = extra.get("server_label")
            if not isinstance(label, str) or not _LABEL.match(label):
                raise bad_request(
                    "server_label must be 1 to 64 letters, digits, '_' or '-', starting with a letter",
                    param=f"{param}.server_label",
                )
            if label in RESERVED_LABELS:
                raise bad_request(f"server_label {label!r} is reserved", param=f"{param}.server_label")
            if any(spec.label == label for spec in out):
                raise bad_request(f"two mcp tools have the label {label!r}", param=f"{param}.server_label")
            if extra.get("connector_id") is not None:
                raise bad_request(
                    "connectors are not supported; name the MCP server by server_url",
                    param=f"{param}.connector_id",
                )
            url = extra.get("server_url")
            if not isinstance(url, str) or not url:
                raise bad_request("mcp tools need a server_url", param=f"{param}.server_url")
            headers = dict(extra.get("headers") or {})
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                raise bad_request("headers must map names to strings", param=f"{param}.headers")
            authorization = extra.get("authorization")
            if isinstance(authorization, str) and authorization:
                headers.setdefault("Authorization", f"Bearer {authorization}")
            allowed_raw = extra.get("allowed_tools")
            allowed: ToolFilter | None = None
            if isinstance(allowed_raw, list):
                if not all(isinstance(n, str) for n in allowed_raw):
                    raise bad_request("allowed_tools lists tool names", param=f"{param}.allowed_tools")
                allowed = (frozenset(allowed_raw), None)
            elif allowed_raw is not None:
                allowed = _filter(allowed_raw, f"{param}.allowed_tools")
            approval_raw = extra.get("require_approval", "always")
            approval: Any
            if approval_raw in ("always", "never"):
                approval = approval_raw
            elif isinstance(approval_raw, dict):
                always = _filter(approval_raw.get("always") or {}, f"{param}.require_approval.always")
                never = _filter(approval_raw.get("never") or {}, f"{param}.require_approval.never")
                approval = (always, never)
            else:
                raise bad_request(
                    "require_approval must be 'always', 'never' or {'always': ..., 'never': ...}",
                    param=f"{param}.require_approval",
                )
            echo = {"type": MCP_TYPE, "server_label": label, "server_url": url}
            for name in ("allowed_tools", "require_approval", "server_description"):
                if extra.get(name) is not None:
                    echo[name] = extra[name]
            echo.setdefault("require_approval", "always")
            out.append(McpServerSpec(label, url, headers, allowed, approval, param, echo))
        return out

    async def ready(
        self, tools: list[ResponsesTool], chain: list[dict[str, Any]], own: list[ResponsesInputItem]
    ) -> McpRequest | None:
        """What a request needs of its MCP servers before it is rendered (None: it names none): their tools
        (listed now, or from the chain's listing), and its `mcp_approval_response` items, checked but not
        carried out (`carry_out`). `chain` is the stored conversation it continues, `own` its own input
        items."""
        specs = self.specs(tools)
        responses = [(i, item) for i, item in enumerate(own) if item.type == "mcp_approval_response"]
        if not specs and not responses:
            return None
        servers: dict[str, McpServer] = {}
        for spec in specs:
            servers[spec.label] = await self._server(spec, chain)
        answers = []
        if responses:
            if any(item.type != "mcp_approval_response" for item in own[responses[0][0] :]):
                raise bad_request(
                    "mcp_approval_response items must come last in the input",
                    param=f"input[{responses[0][0]}]",
                )
            requests = {
                item.get("id"): item
                for item in [*chain, *(i.model_dump(exclude_none=True) for i in own)]
                if item.get("type") == "mcp_approval_request"
            }
            answered = {
                item.get("approval_request_id")
                for item in chain
                if item.get("type") in ("mcp_approval_response", "mcp_call")
                and item.get("approval_request_id")
            }
            for i, item in responses:
                answer, request_id = self._answer(item, i, requests, answered, servers)
                answers.append(answer)
                answered.add(request_id)
        return McpRequest(servers, tuple(answers))

    async def carry_out(self, request: McpRequest) -> McpRequest:
        """`request` with its checked answers carried out, in order: the approved calls run (the side effects
        of the request, so the caller runs this only once nothing can refuse it)."""
        approved = [await answer.carry_out() for answer in request.answers]
        return dataclasses.replace(request, approved=tuple(approved))

    async def _server(self, spec: McpServerSpec, chain: list[dict[str, Any]]) -> McpServer:
        listing = [
            item
            for item in chain
            if item.get("type") == "mcp_list_tools"
            and item.get("server_label") == spec.label
            # A listing that failed outright (no tools, an error) is no listing; one that left tools out is.
            and (item.get("tools") or not item.get("error"))
        ]
        if listing:
            tools = [
                McpTool(
                    t["name"], t.get("description") or "", t.get("input_schema") or {}, t.get("annotations")
                )
                for t in listing[-1].get("tools", [])
            ]
            return McpServer(spec, {t.name: t for t in tools if spec.allows(t)}, None)
        try:
            tools = await self.connector.list_tools(spec.url, spec.headers)
        except McpFailure as failure:
            if failure.kind == "refused":
                raise bad_request(failure.message, param=f"{spec.param}.server_url") from failure
            raise APIError(
                424,
                f"Error retrieving tool list from MCP server {spec.label!r}: {failure.message}",
                type="external_connector_error",
                param=f"{spec.param}.server_url",
                code="http_error" if failure.kind == "http_error" else "mcp_protocol_error",
            ) from failure
        kept: dict[str, McpTool] = {}
        problems = []
        for tool in tools:
            if not spec.allows(tool):
                continue
            problem = _tool_problem(tool)
            if problem is not None:
                problems.append(f"{tool.name}: {problem}")
                logger.warning("mcp server %r: tool %r left out: %s", spec.label, tool.name, problem)
                continue
            kept[tool.name] = tool
        item = {
            "id": "mcpl_" + secrets.token_hex(12),
            "type": "mcp_list_tools",
            "server_label": spec.label,
            "tools": [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                    "annotations": t.annotations,
                }
                for t in kept.values()
            ],
            "error": ("tools left out, unusable: " + "; ".join(problems)) if problems else None,
        }
        return McpServer(spec, kept, item)

    def _answer(
        self,
        item: ResponsesInputItem,
        index: int,
        requests: dict[Any, dict[str, Any]],
        answered: set[Any],
        servers: dict[str, McpServer],
    ) -> tuple[ApprovalAnswer, str]:
        """An `mcp_approval_response` checked (a 400 naming its field), and the id of the request it
        answers."""
        extra = item.model_extra or {}
        param = f"input[{index}]"
        request_id = extra.get("approval_request_id")
        request = requests.get(request_id)
        if request is None:
            raise bad_request(
                f"approval_request_id {request_id!r} matches no mcp_approval_request in the conversation",
                param=f"{param}.approval_request_id",
            )
        if request_id in answered:
            raise bad_request(
                f"the approval request {request_id!r} was already answered",
                param=f"{param}.approval_request_id",
            )
        approve = extra.get("approve")
        if not isinstance(approve, bool):
            raise bad_request("approve must be true or false", param=f"{param}.approve")
        label, name, arguments = request["server_label"], request["name"], request.get("arguments", "")
        server = servers.get(label)
        if server is None:
            raise bad_request(
                f"the approval request is for the MCP server {label!r}, which the request's tools lack",
                param=f"{param}.approval_request_id",
            )
        call = ToolExchange(f"{label}.{name}", arguments, "", CALL_CHANNEL, CALL_CONTENT_TYPE)
        reason = extra.get("reason")

        async def carry_out() -> ApprovedCall:
            if not approve:
                text = "The user did not approve this call." + (
                    f" Reason: {reason}" if isinstance(reason, str) else ""
                )
                return ApprovedCall(dataclasses.replace(call, text=text), request_id, None)
            item_out = mcp_call_item(label, name, arguments, request_id)
            text = await run_call(self.connector, server, name, arguments, item_out)
            return ApprovedCall(dataclasses.replace(call, text=text), request_id, item_out)

        return ApprovalAnswer(call, carry_out), request_id


def _tool_problem(tool: McpTool) -> str | None:
    """Why a tool cannot be shown to the model (its name, or its input schema), or None."""
    if not _TOOL_NAME.match(tool.name):
        return "the name is not 1 to 128 letters, digits, '_', '.' or '-'"
    schema = tool.input_schema
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        return "the input schema is not a JSON object schema"
    try:
        json_schema_to_typescript(schema)
    except (ValueError, TypeError, RecursionError) as error:
        return str(error) or type(error).__name__
    return None


def read_text(output: str | None, error: dict[str, Any] | None) -> str:
    """What the model reads of a call, from its `mcp_call` item's output and error (`run_call` fills both,
    and a later turn reads a client's item back through this same function)."""
    if error is None:
        return output or ""
    if error.get("type") == "mcp_tool_execution_error":
        return f"The tool failed: {output or ''}"
    return f"The call failed: {error.get('message', '')}"


def sent_call(item: ResponsesInputItem) -> ToolExchange | None:
    """An `mcp_call` item as a client sends it back, as the model read it: its arguments, and its output or
    error (None for one that holds neither, or lacks its server or tool: left out, as nobody knows what the
    model read)."""
    extra = item.model_extra or {}
    label, error, output = extra.get("server_label"), extra.get("error"), item.output
    if not isinstance(label, str) or not item.name or not isinstance(item.arguments, str):
        return None
    if error is None and not isinstance(output, str):
        return None
    if error is not None and not (isinstance(error, dict) and (output is None or isinstance(output, str))):
        return None
    text = read_text(output if isinstance(output, str) else None, error)
    return ToolExchange(f"{label}.{item.name}", item.arguments, text, CALL_CHANNEL, CALL_CONTENT_TYPE)


async def run_call(
    connector: McpConnector, server: McpServer, name: str, arguments: str, item: dict[str, Any]
) -> str:
    """Call `name` with the model's `arguments` (JSON text); fill `item`'s output, error and status, and
    return what the model reads. Nothing raises: every failure is in the item and in the text."""
    tool = server.tools.get(name)
    failure: McpFailure | None = None
    if tool is None:
        failure = McpFailure(
            "mcp_protocol_error", f"unknown tool {name!r} on the MCP server {server.spec.label!r}", -32602
        )
    else:
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            failure = McpFailure("mcp_protocol_error", "the arguments are not a JSON object", -32602)
        else:
            try:
                outcome = await connector.call_tool(server.spec.url, server.spec.headers, name, parsed)
            except McpFailure as error:
                failure = error
            else:
                item["output"] = outcome.text
                if outcome.is_error:
                    item["error"] = {"type": "mcp_tool_execution_error", "content": outcome.content}
                    item["status"] = "failed"
                else:
                    item["status"] = "completed"
                return read_text(item["output"], item["error"])
    assert failure is not None
    item["error"] = failure.as_item_error()
    item["status"] = "failed"
    return read_text(item["output"], item["error"])


class McpResponse:
    """The MCP servers of one response being generated: which recipients are theirs, and their calls."""

    def __init__(self, tools: McpTools, request: McpRequest) -> None:
        self.connector = tools.connector
        self.request = request
        self.calls = 0

    def handles(self, recipient: str | None) -> bool:
        return (recipient or "").split(".", 1)[0] in self.request.servers

    def split(self, recipient: str) -> tuple[str, str]:
        label, _, name = recipient.partition(".")
        return label, name

    def needs_approval(self, recipient: str) -> bool:
        label, name = self.split(recipient)
        tool = self.request.servers[label].tools.get(name)
        # A tool it did not list is never called: the call fails without asking anyone.
        return tool is not None and self.request.servers[label].spec.needs_approval(tool)

    async def run(self, recipient: str, arguments: str, item: dict[str, Any]) -> str:
        self.calls += 1
        label, name = self.split(recipient)
        return await run_call(self.connector, self.request.servers[label], name, arguments, item)
