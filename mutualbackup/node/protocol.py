"""The conversation between the coordinator and ``mutualbackup-node serve``, one request per SSH session.

The coordinator asks for the request by name (the SSH command, which the forced command hands
to ``serve`` as ``SSH_ORIGINAL_COMMAND``), then writes one JSON line on stdin:
``{"request": KIND, "args": {...}}``, and keeps stdin open while the request runs (a request
may read further lines from it; its end means the coordinator is gone, and the node stops what
it runs). The node writes JSON lines on stdout: events as they happen (``{"event": "lines",
"lines": [...]}`` for borg's log lines, batched, others per request), then one ``{"event": "result", "ok":
..., "code": ..., "error": ..., "data": {...}}``. Codes: 0 done, 1 failed, 2 refused (a request
the node does not take, or arguments it does not accept: nothing ran).

Shared by both ends; pure.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (node/preload.py)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

PROTOCOL = 1
MAX_HEADER = 8 * 1024 * 1024  # a request's first line (with a signed member file, issue 13) stays far below
DONE, FAILED, REFUSED = 0, 1, 2


class ProtocolError(ValueError):
    """A line that is not what the protocol says."""


@dataclass(frozen=True)
class Reply:
    """What a node answered to one request."""

    kind: str
    code: int
    error: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == DONE


def encode_request(kind: str, args: Mapping[str, Any], node: str) -> bytes:
    """A request's first line: its name, its arguments, and the node it is meant for (``MEMBER/NODE``)."""
    return json.dumps({"protocol": PROTOCOL, "request": kind, "node": node, "args": args},
                      separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict[str, Any], str]:
    """(kind, args, the node it is meant for) of a request's first line; ProtocolError when it is not one."""
    if len(line) > MAX_HEADER:
        raise ProtocolError("the request is too large")
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not a JSON line: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("request"), str) or not isinstance(data.get("args"), dict):
        raise ProtocolError("the request needs a name and arguments")
    if not isinstance(data.get("node"), str):
        raise ProtocolError("the request does not say which node it is meant for")
    if data.get("protocol") != PROTOCOL:
        raise ProtocolError(f"protocol {data.get('protocol')!r} is not this node's ({PROTOCOL}): upgrade one of them")
    return data["request"], data["args"], data["node"]


def event_line(event: str, **fields: Any) -> bytes:
    return json.dumps({"event": event, **fields}, separators=(",", ":")).encode() + b"\n"


def decode_event(line: bytes) -> dict[str, Any]:
    """One event of the node's stdout; ProtocolError when the line is not one."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"the node printed something that is not an event: {line[:120]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise ProtocolError(f"the node printed something that is not an event: {line[:120]!r}")
    return data


def log_lines(event: Mapping[str, Any]) -> list[str]:
    """borg's log lines an event carries (none for other events)."""
    if event.get("event") != "lines" or not isinstance(event.get("lines"), list):
        return []
    return [str(line) for line in event["lines"]]


def reply_of(kind: str, event: Mapping[str, Any]) -> Reply:
    """The :class:`Reply` a ``result`` event carries."""
    code = event.get("code")
    if not isinstance(code, int):
        raise ProtocolError("the result has no code")
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    error = event.get("error")
    return Reply(kind, code, str(error) if error is not None else None, data)


def pack(data: bytes) -> str:
    """Bytes for a JSON value (base64)."""
    return base64.b64encode(data).decode("ascii")


def unpack(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)
