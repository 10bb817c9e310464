"""Server-sent events framing of OpenAI streams: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One SSE event. JSON never contains a raw newline, so one `data:` line is always enough."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


def events(payloads: Sequence[BaseModel]) -> bytes:
    """Several SSE events as one write: a batch of engine outputs costs the HTTP path one send
    (one ASGI message through Serve) instead of one per token; the client still parses one
    event per output."""
    return b"".join(event(payload) for payload in payloads)
