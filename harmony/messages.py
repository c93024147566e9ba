"""Typed harmony messages: the plain data the renderer turns into tokens and the parser produces.

Field names and defaults follow the official `openai-harmony` types, so a conversation built here reads the
same as one built with the official library. `DeveloperContent.response_formats` is this project's addition
(the official library has no structured-output section; see `render.py` for the layout chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class ReasoningEffort(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True, slots=True)
class Author:
    role: Role
    # For tools, the name is what the header carries (`functions.get_weather`); for others, `user:alice`.
    name: str | None = None


@dataclass(slots=True)
class TextContent:
    text: str


@dataclass(slots=True)
class ToolDescription:
    name: str
    description: str = ""
    # A JSON Schema object; None means the tool takes no arguments (`() => any`).
    parameters: dict[str, Any] | None = None


@dataclass(slots=True)
class ToolNamespaceConfig:
    name: str
    description: str | None = None
    tools: list[ToolDescription] = field(default_factory=list)


@dataclass(slots=True)
class ChannelConfig:
    valid_channels: list[str] = field(default_factory=lambda: ["analysis", "commentary", "final"])
    channel_required: bool = True


DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


@dataclass(slots=True)
class SystemContent:
    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    reasoning_effort: ReasoningEffort | None = ReasoningEffort.MEDIUM
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    conversation_start_date: str | None = None
    channel_config: ChannelConfig | None = field(default_factory=ChannelConfig)
    # Built-in tools (browser, python) live here, keyed by namespace name.
    tools: dict[str, ToolNamespaceConfig] | None = None


@dataclass(slots=True)
class ResponseFormat:
    """A named JSON Schema the answer must follow (structured outputs)."""

    name: str
    schema: dict[str, Any]
    description: str | None = None


@dataclass(slots=True)
class DeveloperContent:
    instructions: str | None = None
    # Function tools go in the `functions` namespace, keyed by namespace name.
    tools: dict[str, ToolNamespaceConfig] | None = None
    response_formats: list[ResponseFormat] = field(default_factory=list)


Content = TextContent | SystemContent | DeveloperContent


@dataclass(slots=True)
class Message:
    author: Author
    content: list[Content]
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    @classmethod
    def from_role(
        cls,
        role: Role,
        content: str | Content,
        *,
        name: str | None = None,
        channel: str | None = None,
        recipient: str | None = None,
        content_type: str | None = None,
    ) -> Message:
        item = TextContent(content) if isinstance(content, str) else content
        return cls(Author(role, name), [item], channel, recipient, content_type)

    @property
    def text(self) -> str:
        """The concatenated text of the message's text items."""
        return "".join(c.text for c in self.content if isinstance(c, TextContent))


def function_tools_namespace(tools: list[ToolDescription]) -> dict[str, ToolNamespaceConfig]:
    """The developer-message namespace for function tools, as `with_function_tools` builds it."""
    return {"functions": ToolNamespaceConfig("functions", None, list(tools))}


# The built-in tools' texts, as the official library ships them.
BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""

PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
    "notebook environment. python will respond with the output of the execution or time out after 120.0 "
    "seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this "
    "session is UNKNOWN. Depends on the cluster."
)


def browser_tool_namespace() -> ToolNamespaceConfig:
    """The built-in `browser` namespace (search, open, find), for the system message."""
    return ToolNamespaceConfig(
        "browser",
        BROWSER_DESCRIPTION,
        [
            ToolDescription(
                "search",
                "Searches for information related to `query` and displays `topn` results.",
                {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string"},
                        "topn": {"type": "number", "default": 10},
                        "source": {"type": "string"},
                    },
                    "required": ["query"],
                },
            ),
            ToolDescription(
                "open",
                "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
                "showing `num_lines` lines.\n"
                "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
                "If `cursor` is not provided, the most recent page is implied.\n"
                "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
                "If `loc` is not provided, the viewport will be positioned at the beginning of the document "
                "or centered on the most relevant passage, if available.\n"
                "Use this function without `id` to scroll to a new location of an opened page.",
                {
                    "type": "object",
                    "properties": {
                        "id": {"type": ["number", "string"], "default": -1},
                        "cursor": {"type": "number", "default": -1},
                        "loc": {"type": "number", "default": -1},
                        "num_lines": {"type": "number", "default": -1},
                        "view_source": {"type": "boolean", "default": False},
                        "source": {"type": "string"},
                    },
                },
            ),
            ToolDescription(
                "find",
                "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
                {
                    "type": "object",
                    "properties": {
                        "pattern": {"type": "string"},
                        "cursor": {"type": "number", "default": -1},
                    },
                    "required": ["pattern"],
                },
            ),
        ],
    )


def python_tool_namespace() -> ToolNamespaceConfig:
    """The built-in `python` namespace (no typed tools: its description is printed as it is)."""
    return ToolNamespaceConfig("python", PYTHON_DESCRIPTION, [])
