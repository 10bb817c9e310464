"""Chat messages as the conversation a chat template renders, built the way vLLM's OpenAI server
builds it: the router tokenizes chats itself, so the same messages must become the same prompt
they would in vLLM (0.32: vllm/renderers/chat_utils.py, vllm/renderers/hf.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.api.protocol import ChatMessage

Conversation = list[dict[str, str]]


def supports_developer_role(chat_template: Any) -> bool:
    """Whether a tokenizer's chat_template names the developer role, by vLLM's own test
    (renderers/hf.py:512, _detect_developer_role_support). transformers keeps several templates
    as a dict and renders a chat without tools with the "default" one."""
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return isinstance(chat_template, str) and (
        '"developer"' in chat_template or "'developer'" in chat_template
    )


def conversation(messages: Sequence[ChatMessage], developer_role: bool) -> Conversation:
    """The template's `messages`; `developer_role`: whether the template handles that role."""
    rendered = [_message(m) for m in messages]
    if developer_role or all(m["role"] != "developer" for m in rendered):
        return rendered
    # vLLM renders developer messages as system ones when the template does not know the role,
    # then merges the system messages into one at the start, as some templates take a system
    # message only there (renderers/hf.py:802-806: _convert_developer_to_system and
    # _consolidate_system_messages).
    rendered = [{**m, "role": "system"} if m["role"] == "developer" else m for m in rendered]
    if all(m["role"] != "system" for m in rendered[1:]):
        return rendered
    system = "\n\n".join(m["content"] for m in rendered if m["role"] == "system" and m["content"])
    return [{"role": "system", "content": system}, *(m for m in rendered if m["role"] != "system")]


def _message(message: ChatMessage) -> dict[str, str]:
    content = message.content
    if isinstance(content, list):
        # vLLM joins a message's text parts with newlines for a template that takes string
        # content (renderers/chat_utils.py:1883, _parse_chat_message_content_parts); only a
        # template that loops over content parts gets them from vLLM as a list instead.
        content = "\n".join(part.text for part in content)
    rendered = {"role": message.role, "content": content or ""}
    if message.name is not None:
        # vLLM hands a message's name to the template (renderers/chat_utils.py:2142).
        rendered["name"] = message.name
    return rendered
