"""Conversations in data files: message arrays (TRL's conversational form) and HH-RLHF's
plain-text dialogues, checked and turned into our prompt model.

A prompt is a `str` (one user turn) or, when the conversation holds more than that, a list
of {"role": "system"|"user"|"assistant", "content": str} ending with a user turn; a
conversation of a single user message collapses to its string. A response is a `str`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Union

from .jsonl import Row, json_type, show

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
Prompt = Union[str, list[Message]]


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as a message list (a `str` is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def collapse(messages: list[Message]) -> Prompt:
    """The prompt model's form of a checked message list ending with a user turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def _turn_order(roles: list[str], last: str, name: Callable[[str], str]) -> tuple[int, str] | None:
    """(index, what is wrong) of the first turn out of order, or None. The order every chat
    template takes: an optional system message first, then user and assistant alternating,
    starting with user, ending with `last`."""
    first = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles):
        want = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if role != want:
            if role == "system":
                return i, "a system message can only come first"
            after = " after an optional system message" if name("system") else ""
            return i, (f"expected {name(want)} here (turns alternate {name('user')}, {name('assistant')}{after}), "
                       f"got {name(role)}")
    if roles[-1] != last:
        if last == "user":
            return len(roles) - 1, f"a prompt must end with a {name('user')} turn, got {name(roles[-1])}"
        return len(roles) - 1, f"the conversation must end with the {name('assistant')} response, got {name(roles[-1])}"
    return None


def message(row: Row, label: str, value: Any, empty_ok: bool = True) -> Message:
    """One {"role", "content"} object, as a fresh dict of those two keys (other keys are
    ignored). A user turn must say something; system and assistant contents may be empty
    unless empty_ok is False."""
    if not isinstance(value, dict):
        raise row.error(label, f'expected a message {{"role": ..., "content": ...}}, got {json_type(value)}')
    role = row.get("role", value, f"{label}.role")
    if role not in ROLES:
        raise row.error(f"{label}.role", f'expected "system", "user" or "assistant", got {show(role)}')
    content = row.text("content", row.get("content", value, f"{label}.content"), f"{label}.content",
                       empty_ok=empty_ok and role != "user")
    return {"role": role, "content": content}


def messages(row: Row, field: str, value: Any, last: str) -> list[Message]:
    """A JSON array of messages in turn order, ending with a `last` ("user" or "assistant") turn."""
    if not isinstance(value, list):
        raise row.error(field, f"expected an array of messages, got {json_type(value)}")
    if not value:
        raise row.error(field, "empty array, expected messages")
    out = [message(row, f"{field}[{i}]", m) for i, m in enumerate(value)]
    bad = _turn_order([m["role"] for m in out], last, lambda r: f'"{r}"')
    if bad:
        raise row.error(f"{field}[{bad[0]}].role", bad[1])
    return out


# HH-RLHF publishes each side of a pair as one text: "\n\nHuman: ...\n\nAssistant: ..."
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_NAME = {"user": '"Human:"', "assistant": '"Assistant:"', "system": ""}  # HH has no system turn


def hh_messages(row: Row, field: str, text: str) -> list[Message] | None:
    """The turns of an HH-style dialogue as messages ending with the assistant's, or None when
    the text has no "\\n\\nHuman:"/"\\n\\nAssistant:" turn at all. The space after a turn's
    colon is part of the marker, not of the content."""
    row.check_unicode(field, text)
    body = text.lstrip()
    if body.startswith(("Human:", "Assistant:")):
        text = "\n\n" + body
    turns = list(_HH_TURN.finditer(text))
    if not turns:
        return None
    if text[: turns[0].start()].strip():
        raise row.error(field, 'text before the first "Human:" turn')
    out = []
    for j, turn in enumerate(turns):
        content = text[turn.end(): turns[j + 1].start() if j + 1 < len(turns) else len(text)]
        out.append({"role": _HH_ROLE[turn[1]], "content": content.removeprefix(" ")})
    bad = _turn_order([m["role"] for m in out], "assistant", _HH_NAME.__getitem__)
    if bad:
        raise row.error(field, f"turn {bad[0] + 1}: {bad[1]}")
    for i, m in enumerate(out):
        if m["role"] == "user" and not m["content"].strip():
            raise row.error(field, f'turn {i + 1}: empty "Human:" turn')
    return out


def prompt(row: Row, key: str = "prompt") -> Prompt:
    """A prompt field: a non-blank string, or an array of messages ending with a user turn."""
    value = row.get(key)
    if isinstance(value, str):
        return row.text(key, value)
    if isinstance(value, list):
        return collapse(messages(row, key, value, last="user"))
    raise row.error(key, f"expected a string or an array of messages, got {json_type(value)}")


def response(row: Row, label: str, value: Any, empty_ok: bool) -> str:
    """A response: a string, or (TRL's conversational form) an array holding one assistant message."""
    if isinstance(value, str):
        return row.text(label, value, empty_ok=empty_ok)
    if isinstance(value, list):
        if len(value) != 1:
            raise row.error(label, f"expected one assistant message, got {len(value)} messages")
        m = message(row, f"{label}[0]", value[0], empty_ok=empty_ok)
        if m["role"] != "assistant":
            raise row.error(f"{label}[0].role", f'expected "assistant", got "{m["role"]}"')
        return m["content"]
    raise row.error(label, f"expected a string or an array holding one assistant message, got {json_type(value)}")


def whole_conversation(row: Row, key: str) -> list[Message] | None:
    """A field holding a whole conversation that ends with the assistant's response: a message
    array or HH-style text; None for a string that is not HH-style (a bare response)."""
    value = row.get(key)
    if isinstance(value, list):
        return messages(row, key, value, last="assistant")
    if isinstance(value, str):
        return hh_messages(row, key, value)
    raise row.error(key, f"expected an array of messages or a string, got {json_type(value)}")


def shared_prompt(row: Row, chosen: list[Message], rejected: list[Message], rejected_is_text: bool) -> Prompt:
    """The prompt of an implicit-prompt pair: the conversation before the last assistant turn,
    which chosen and rejected must share."""
    pc, pr = chosen[:-1], rejected[:-1]
    if pc == pr:
        return collapse(pc)
    rule = "without a prompt, chosen and rejected must be the same conversation up to their last assistant turn"
    if len(pc) != len(pr):
        raise row.error("rejected", f"{len(pr)} turns before its last assistant turn, chosen has {len(pc)}; {rule}")
    i = next(i for i, (a, b) in enumerate(zip(pc, pr)) if a != b)
    if rejected_is_text:
        raise row.error("rejected", f"turn {i + 1} differs from chosen's; {rule}")
    raise row.error(f"rejected[{i}]", f"differs from chosen[{i}]; {rule}")

