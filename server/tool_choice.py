"""`tool_choice` enforced by constrained decoding, not left to the model's goodwill.

* `none`: the tools are not offered in the prompt and `<|call|>` can never be sampled.
* `required` or a named function: the answer starts with the tool-call header, forced token by token
  (` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>`, the renderer's own tokens). With
  several tools allowed, only the tokens of some offered name can follow. The model then writes the
  arguments and can only end them with `<|call|>`. Forcing the header first means no reasoning precedes a
  forced call.
"""

from __future__ import annotations

import tiktoken
import torch

from engine.request import LogitsProcessor
from harmony import encoding as tok

# Inside forced arguments nothing but `<|call|>` may end or restructure the message.
_BANNED_IN_ARGUMENTS = [tok.END, tok.RETURN, tok.START, tok.CHANNEL, tok.MESSAGE]


def tool_call_header(encoding: tiktoken.Encoding, name: str) -> list[int]:
    """The tokens of a tool call's header after `<|start|>assistant`, exactly as the renderer writes them."""
    encode = encoding.encode_ordinary
    return [
        *encode(f" to=functions.{name}"),
        tok.CHANNEL,
        *encode("commentary"),
        *encode(" "),
        tok.CONSTRAIN,
        *encode("json"),
        tok.MESSAGE,
    ]


class ForcedToolCall:
    """Forces one of the given headers, then keeps the arguments free of everything but `<|call|>`."""

    def __init__(self, headers: list[list[int]]) -> None:
        assert headers
        self.headers = headers

    def __call__(self, output: list[int], logits: torch.Tensor) -> torch.Tensor:
        position = len(output)
        allowed = {
            header[position]
            for header in self.headers
            if len(header) > position and header[:position] == output[:position]
        }
        if allowed:
            row = torch.full_like(logits, float("-inf"))
            index = torch.tensor(sorted(allowed), device=logits.device)
            row[index] = logits[index]
            return row
        row = logits.clone()
        row[_BANNED_IN_ARGUMENTS] = float("-inf")
        return row


def ban_tool_calls(output: list[int], logits: torch.Tensor) -> torch.Tensor:
    row = logits.clone()
    row[tok.CALL] = float("-inf")
    return row


def tool_choice_processors(
    encoding: tiktoken.Encoding, choice: str | None, names: list[str]
) -> list[LogitsProcessor]:
    """The processors for a request's `tool_choice` (`auto` and None need none)."""
    if choice == "none":
        return [ban_tool_calls]
    if choice is None or choice == "auto" or not names:
        return []
    allowed = names if choice == "required" else [choice]
    return [ForcedToolCall([tool_call_header(encoding, name) for name in allowed])]
