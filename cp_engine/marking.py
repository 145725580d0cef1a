"""How a client marks context blocks in an OpenAI-style request (engine-neutral).

Ways to mark, in order of precedence (documented in README with openai-client code):
1. top-level ``context_blocks`` (list of str, retrieval/importance order) and optional
   ``conversation_id`` (str), sent through ``extra_body`` — the canonical interface;
2. ``cp_context_blocks`` and ``cp_conversation_id`` inside ``chat_template_kwargs``:
   the same values, for routers that rebuild the request from their own schema and
   drop unknown fields (SGLang's router keeps ``chat_template_kwargs`` whole). Sent
   together with the top-level field of the same meaning, it is an error. Blend's
   fields travel the same way (``cp_context_suffix``, ``cp_context_keep_order``:
   ``lift_template_marks`` gives them to ``cp_engine.blend.marks``' reader);
3. text content parts of the last user message carrying ``"cp_block": true``; the
   remaining parts are the question (without the plugin an engine simply joins the
   parts, so such requests still work, unoptimised);
4. the conversation id may also come from the ``X-CP-Conversation-Id`` header.

Contract: ``find_marks`` returns None for an unmarked request (the caller then leaves it
byte-identical), a ``Marks`` otherwise, and raises ``InvalidBlocks`` (HTTP 400, a
``ValueError``) for fields that are invalid for the API, naming the field:
``context_blocks`` not a list of non-empty strings (an empty or whitespace-only block is
named by its index), a marked content part that is not non-empty text, or a
conversation id (field or header) that is not a 1..256-character string. The
conversation id is checked whenever it is sent, with or without blocks. An empty
``context_blocks`` list marks nothing. It never mutates its inputs. Where the marks
came from ``chat_template_kwargs``, ``Marks.template_kwargs`` holds those kwargs
without them (the caller puts it back so the engine's template never sees them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence  # (isinstance on the request path: typing's aliases check slower)
from dataclasses import dataclass
from typing import Any

from cp_engine.blocks import estimate_tokens
from cp_engine.pipeline import InvalidBlocks, validate_blocks

__all__ = ["Marks", "InvalidBlocks", "find_marks", "may_carry_marks", "check_conversation_id", "drop_template_marks",
           "lift_template_marks", "named_as_sent", "fallback_messages", "prefix_tokens",
           "BLOCKS_FIELD", "CONVERSATION_FIELD", "PART_FLAG", "CONVERSATION_HEADER",
           "CONVERSATION_HEADER_NAME", "TEMPLATE_KWARGS_FIELD", "KWARG_BLOCKS", "KWARG_CONVERSATION"]

BLOCKS_FIELD = "context_blocks"
CONVERSATION_FIELD = "conversation_id"
PART_FLAG = "cp_block"
CONVERSATION_HEADER = "x-cp-conversation-id"
CONVERSATION_HEADER_NAME = "X-CP-Conversation-Id"  # as documented, for error messages
_MAX_ID_CHARS = 256
TEMPLATE_KWARGS_FIELD = "chat_template_kwargs"
KWARG_BLOCKS = "cp_context_blocks"
KWARG_CONVERSATION = "cp_conversation_id"
# Each kwarg and the top-level field it stands for (the last two are blend's fields,
# cp_engine.blend.marks.SUFFIX_FIELD and KEEP_ORDER_FIELD).
_LIFTED = ((KWARG_BLOCKS, BLOCKS_FIELD), (KWARG_CONVERSATION, CONVERSATION_FIELD),
           ("cp_context_suffix", "context_suffix"), ("cp_context_keep_order", "context_keep_order"))
_OUR_KWARGS = frozenset(inner for inner, _ in _LIFTED)


@dataclass(frozen=True)
class Marks:
    blocks: list[str]
    conversation_id: str | None
    messages: list[Any]  # messages with part-marked blocks removed (else the input list)
    source: str  # "field", "template_kwargs" or "parts"
    template_kwargs: dict | None = None  # chat_template_kwargs less our keys, where they held marks


def _conversation(extra: Mapping[str, Any], headers: Mapping[str, str] | None) -> str | None:
    """The request's conversation id (the field wins over the header), checked."""
    conv, source = extra.get(CONVERSATION_FIELD), CONVERSATION_FIELD
    if conv is None and headers is not None:
        try:
            conv = headers.get(CONVERSATION_HEADER)
        except Exception:
            conv = None
        source = f"{CONVERSATION_FIELD} (header {CONVERSATION_HEADER_NAME})"
    return None if conv is None else check_conversation_id(conv, source)


def check_conversation_id(conv: Any, source: str = CONVERSATION_FIELD) -> str:
    """``conv`` if it is a valid conversation id, else ``InvalidBlocks`` naming ``source``."""
    # The documented type only: turning 42 into "42" would hide a client bug, and the
    # same id sent both ways would silently name one conversation.
    if not isinstance(conv, str):
        raise InvalidBlocks(f"{source} must be a string, got {type(conv).__name__}")
    if not conv or len(conv) > _MAX_ID_CHARS:
        raise InvalidBlocks(f"{source} must be 1..{_MAX_ID_CHARS} characters, got {len(conv)}")
    return conv


def _last_user(messages: Sequence[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, Mapping) and m.get("role") == "user":
            return i
    return None


def _part_blocks(messages: list[Any]) -> tuple[list[str], list[Any]] | None:
    i = _last_user(messages)
    if i is None:
        return None
    content = messages[i].get("content")
    if not isinstance(content, list):
        return None
    blocks, rest = [], []
    for j, part in enumerate(content):
        if isinstance(part, Mapping) and part.get(PART_FLAG) is True:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidBlocks(f"content parts marked {PART_FLAG!r} must be text parts")
            if not part["text"].strip():
                raise InvalidBlocks(f"messages[{i}].content[{j}] (marked {PART_FLAG!r}) is empty")
            blocks.append(part["text"])
        else:
            rest.append(part)
    if not blocks:
        return None
    new_msg = dict(messages[i])
    # A question given as one text part becomes a plain string: templates render it
    # exactly like a string question, so both marking styles share cached prefixes.
    if len(rest) == 1 and isinstance(rest[0], Mapping) and rest[0].get("type") == "text":
        new_msg["content"] = rest[0].get("text", "")
    else:
        new_msg["content"] = rest
    out = list(messages)
    out[i] = new_msg
    return blocks, out


def lift_template_marks(extra: Mapping[str, Any], kwargs: Any) -> tuple[Mapping[str, Any], dict | None]:
    """(``extra`` with the marks found in ``kwargs`` as top-level fields, ``kwargs``
    without them); ``kwargs`` as None where they hold none of ours. ``InvalidBlocks``
    where a mark is sent both ways."""
    if not isinstance(kwargs, Mapping) or _OUR_KWARGS.isdisjoint(kwargs):
        return extra, None
    out = dict(extra)
    for inner, field in _LIFTED:
        if inner in kwargs:
            if extra.get(field) is not None:
                raise InvalidBlocks(f"{field} and {TEMPLATE_KWARGS_FIELD}.{inner} were both sent; send one")
            out[field] = kwargs[inner]
    return out, {k: v for k, v in kwargs.items() if k not in _OUR_KWARGS}


def find_marks(extra: Mapping[str, Any] | None, messages: Any,
               headers: Mapping[str, str] | None = None, template_kwargs: Any = None) -> Marks | None:
    """The request's marks (module docs). ``messages`` is None for a text completion,
    which can only be marked by the field. ``template_kwargs``: the request's
    ``chat_template_kwargs`` where the caller's ``extra`` does not hold it."""
    extra = extra or {}
    if template_kwargs is None:
        template_kwargs = extra.get(TEMPLATE_KWARGS_FIELD)
    extra, rest = lift_template_marks(extra, template_kwargs)
    try:
        conversation = _conversation(extra, headers)
        blocks = validate_blocks(extra[BLOCKS_FIELD]) if extra.get(BLOCKS_FIELD) is not None else None
    except InvalidBlocks as exc:
        if rest is None:
            raise
        raise InvalidBlocks(named_as_sent(str(exc), template_kwargs)) from None
    if blocks is not None:
        if not blocks:
            return None
        if messages is not None and not isinstance(messages, (list, tuple)):
            # Engines validate messages themselves; a caller that did not gets a 400 here.
            raise InvalidBlocks(f"messages must be a list of objects, got {type(messages).__name__}")
        source = "template_kwargs" if rest is not None and KWARG_BLOCKS in template_kwargs else "field"
        return Marks(blocks, conversation, list(messages or []), source, rest)
    if isinstance(messages, list):
        found = _part_blocks(messages)
        if found is not None:
            return Marks(found[0], conversation, found[1], "parts", rest)
    return None


def may_carry_marks(extra: Mapping[str, Any] | None, messages: Any,
                    headers: Mapping[str, str] | None = None, template_kwargs: Any = None) -> bool:
    """Whether a request (``find_marks``' arguments) could hold anything of ours: a
    field of its own (``extra``: marks and blend's fields alike), one of our
    ``chat_template_kwargs``, the conversation header or a marked content part.

    False only where ``find_marks`` returns None without raising and no blend field
    is sent, so a caller may pass such a request on without reading it further. A
    few dictionary reads: the test every unmarked request pays."""
    if extra:
        return True
    if template_kwargs is not None and isinstance(template_kwargs, Mapping) \
            and not _OUR_KWARGS.isdisjoint(template_kwargs):
        return True
    if headers is not None:
        try:
            if headers.get(CONVERSATION_HEADER) is not None:
                return True
        except Exception:  # find_marks reads such headers as holding no id
            pass
    if isinstance(messages, list):
        i = _last_user(messages)
        if i is not None:
            content = messages[i].get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, Mapping) and part.get(PART_FLAG) is True:
                        return True
    return False


def drop_template_marks(request: Any, marks: Marks | None) -> None:
    """Set an engine request's ``chat_template_kwargs`` to what is left of them once the
    marks read from them are out (None when nothing is), so its template never sees
    them; a request whose marks came another way is left alone."""
    if marks is not None and marks.template_kwargs is not None:
        request.chat_template_kwargs = marks.template_kwargs or None


def named_as_sent(message: str, kwargs: Any) -> str:
    """An error about a value lifted from ``kwargs`` (the request's
    ``chat_template_kwargs``), named as the client sent it."""
    if not isinstance(kwargs, Mapping):
        return message
    for inner, field in _LIFTED:
        if inner in kwargs and message.startswith(field):
            return f"{TEMPLATE_KWARGS_FIELD}.{inner}" + message[len(field):]
    return message


def fallback_messages(marks: Marks) -> list[Any] | None:
    """Blocks in their given order, plainly joined, in the last user turn.

    Used when the rewrite itself failed: the request keeps its context, unoptimised.
    """
    msgs = [dict(m) if isinstance(m, Mapping) else m for m in marks.messages]
    i = _last_user(msgs)
    if i is None:
        return None
    text = "\n\n".join(marks.blocks)
    q = msgs[i].get("content")
    if isinstance(q, list):
        msgs[i]["content"] = [{"type": "text", "text": text}] + list(q)
    else:
        msgs[i]["content"] = f"{text}\n\n{q}" if q else text
    return msgs


def prefix_tokens(messages: Sequence[Any]) -> int:
    """Estimated prompt tokens before the last user turn's content (template included)."""
    i = _last_user(messages)
    before = list(messages[:i]) if i is not None else list(messages)
    total = 4  # the last user turn's own role header
    for m in before:
        total += 4  # role header and separators of a typical chat template
        c = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(c, str):
            total += estimate_tokens(c)
        elif isinstance(c, list):
            total += sum(estimate_tokens(p.get("text", "") or "") for p in c if isinstance(p, Mapping))
    return total
