"""Request-marking contract: what a malformed mark is, and that it is named.

Covers ``cp_engine.marking.find_marks`` (the check every engine path runs) and the
Python API (``build_messages`` / ``build_batch_messages`` / ``reorder``), which raise
the same message as a ``ValueError``.
"""
from __future__ import annotations

import copy

import pytest

from cp_engine import api
from cp_engine.marking import InvalidBlocks, find_marks
from cp_engine.pipeline import ContextPipeline

MSGS = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
NOT_STRINGS = [42, 0, True, False, 1.5, ["x"], {"id": "x"}]


def _parts(*blocks: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": b, "cp_block": True} for b in blocks]
             + [{"type": "text", "text": "question?"}]}]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(InvalidBlocks) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# -- conversation id ------------------------------------------------------------------

@pytest.mark.parametrize("conv", NOT_STRINGS + [""], ids=repr)
@pytest.mark.parametrize("marked_by", ["field", "parts", "nothing"])
def test_a_conversation_id_that_is_not_a_non_empty_string_is_rejected_naming_the_field(conv, marked_by):
    extra = {"conversation_id": conv}
    msgs = MSGS
    if marked_by == "field":
        extra["context_blocks"] = ["doc"]
    elif marked_by == "parts":
        msgs = _parts("doc")
    message = _error(find_marks, extra, msgs)
    assert message.startswith("conversation_id ")
    assert type(conv).__name__ in message or "1..256 characters" in message


def test_an_empty_conversation_header_is_rejected_naming_the_header():
    message = _error(find_marks, {"context_blocks": ["doc"]}, MSGS, headers={"x-cp-conversation-id": ""})
    assert "X-CP-Conversation-Id" in message and "conversation_id" in message
    # Also when nothing else is marked: the client meant to use the conversation.
    assert "X-CP-Conversation-Id" in _error(find_marks, {}, MSGS, headers={"x-cp-conversation-id": ""})


def test_the_field_wins_over_the_header_and_valid_ids_pass():
    m = find_marks({"context_blocks": ["doc"], "conversation_id": "body"}, MSGS,
                   headers={"x-cp-conversation-id": ""})
    assert m.conversation_id == "body"
    m = find_marks({"context_blocks": ["doc"]}, MSGS, headers={"x-cp-conversation-id": "hdr"})
    assert m.conversation_id == "hdr"
    assert find_marks({"conversation_id": "c"}, MSGS) is None  # a valid id alone marks nothing


def test_completion_marks_go_through_the_same_checks():
    """A text completion passes ``messages=None``: only the field marks it."""
    assert find_marks({"context_blocks": ["doc"]}, None).blocks == ["doc"]
    assert find_marks({}, None) is None
    assert _error(find_marks, {"context_blocks": ["doc"], "conversation_id": 42}, None).startswith("conversation_id")
    assert _error(find_marks, {"context_blocks": ["doc", ""]}, None) == "context_blocks[1] is empty"


# -- empty blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("empty", ["", " ", "\n\t  \n"], ids=repr)
def test_an_empty_or_whitespace_block_is_rejected_naming_its_index(empty):
    blocks = ["a", "b", "c", empty, "e"]
    before = copy.deepcopy(blocks)
    message = _error(find_marks, {"context_blocks": blocks}, MSGS)
    assert message.startswith("context_blocks[3] is empty")
    assert blocks == before


def test_ten_identical_empty_blocks_are_rejected_not_rendered_as_a_bare_label():
    assert _error(find_marks, {"context_blocks": [""] * 10}, MSGS) == "context_blocks[0] is empty"
    with pytest.raises(InvalidBlocks, match=r"context_blocks\[0\] is empty"):
        ContextPipeline().rewrite_messages(MSGS, [""] * 10)


def test_an_empty_marked_content_part_is_rejected_naming_the_part():
    message = _error(find_marks, None, [{"role": "system", "content": "s"}] + _parts("doc", "  "))
    assert message == "messages[1].content[1] (marked 'cp_block') is empty"


def test_an_empty_block_list_marks_nothing():
    assert find_marks({"context_blocks": []}, MSGS) is None
    assert find_marks({"context_blocks": [], "conversation_id": "c"}, MSGS) is None


# -- Python API -----------------------------------------------------------------------

def test_python_api_raises_the_same_message_for_an_empty_block():
    blocks = ["doc a", "doc b", "doc c", "   "]
    pipe = ContextPipeline()
    assert _error(api.build_messages, blocks, "q?", pipeline=pipe) == "context_blocks[3] is empty (whitespace only)"
    assert _error(api.reorder, ["doc a", ""], pipeline=pipe) == "context_blocks[1] is empty"
    assert _error(api.build_batch_messages, [(["doc a"], "q1"), (blocks, "q2")]) == \
        "items[1]: context_blocks[3] is empty (whitespace only)"


def test_python_api_keeps_an_empty_block_list_as_question_only():
    pipe = ContextPipeline()
    assert api.build_messages([], "q?", system="s", pipeline=pipe) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q?"}]
    assert api.reorder([], pipeline=pipe) == []
    batch = api.build_batch_messages([([], "q1"), (["doc"], "q2")])
    assert batch.messages[0] == [{"role": "user", "content": "q1"}]
    assert "doc" in batch.messages[1][0]["content"]


# -- marks inside chat_template_kwargs ------------------------------------------------

def test_marks_in_template_kwargs_read_like_the_fields_and_leave_the_other_kwargs():
    kwargs = {"cp_context_blocks": ["a", "b"], "cp_conversation_id": "c1", "enable_thinking": False}
    before = copy.deepcopy(kwargs)
    marks = find_marks({}, MSGS, None, kwargs)
    assert (marks.blocks, marks.conversation_id, marks.source) == (["a", "b"], "c1", "template_kwargs")
    assert marks.template_kwargs == {"enable_thinking": False} and kwargs == before
    # A body (proxy, SGLang) carries them in its own chat_template_kwargs field.
    body = {"messages": MSGS, "chat_template_kwargs": kwargs}
    assert find_marks(body, MSGS) == marks


def test_kwargs_without_our_keys_leave_the_request_unmarked_and_untouched():
    assert find_marks({}, MSGS, None, {"enable_thinking": False}) is None
    marks = find_marks({"context_blocks": ["a"]}, MSGS, None, {"enable_thinking": False})
    assert marks.source == "field" and marks.template_kwargs is None


def test_a_conversation_id_in_kwargs_joins_blocks_sent_another_way():
    marks = find_marks({"context_blocks": ["a"]}, MSGS, None, {"cp_conversation_id": "c"})
    assert (marks.conversation_id, marks.source, marks.template_kwargs) == ("c", "field", {})
    marks = find_marks({}, _parts("x"), None, {"cp_conversation_id": "c"})
    assert (marks.blocks, marks.conversation_id, marks.source) == (["x"], "c", "parts")


@pytest.mark.parametrize("field,inner,value", [("context_blocks", "cp_context_blocks", ["b"]),
                                               ("conversation_id", "cp_conversation_id", "c")])
def test_the_same_mark_sent_twice_is_rejected_naming_both(field, inner, value):
    msg = _error(find_marks, {field: value, "context_blocks": ["a"]}, MSGS, None, {inner: value})
    assert field in msg and f"chat_template_kwargs.{inner}" in msg


def test_malformed_marks_in_kwargs_are_named_as_sent():
    assert _error(find_marks, {}, MSGS, None, {"cp_context_blocks": ["ok", " "]}).startswith(
        "chat_template_kwargs.cp_context_blocks[1] is empty")
    assert _error(find_marks, {}, MSGS, None, {"cp_context_blocks": "one"}).startswith(
        "chat_template_kwargs.cp_context_blocks must be a list")
    assert _error(find_marks, {}, MSGS, None, {"cp_context_blocks": ["a"], "cp_conversation_id": 7}).startswith(
        "chat_template_kwargs.cp_conversation_id must be a string")
    assert find_marks({}, MSGS, None, {"cp_context_blocks": []}) is None


def test_blend_fields_in_template_kwargs_lift_beside_the_others_and_leave_the_template():
    from cp_engine.blend.marks import KEEP_ORDER_FIELD, SUFFIX_FIELD, read_blend_marks
    from cp_engine.marking import lift_template_marks, named_as_sent

    kwargs = {"cp_context_blocks": ["a"], "cp_context_suffix": ["memory"], "cp_context_keep_order": True, "x": 1}
    fields, rest = lift_template_marks({"other": 2}, kwargs)
    assert read_blend_marks(fields).suffix == ["memory"] and read_blend_marks(fields).keep_order is True
    assert {SUFFIX_FIELD, KEEP_ORDER_FIELD} <= set(fields) and rest == {"x": 1}
    assert find_marks({}, MSGS, None, kwargs).template_kwargs == {"x": 1}  # none of ours reach the template
    assert lift_template_marks({"a": 1}, {"x": 1}) == ({"a": 1}, None)
    assert "context_suffix" in _error(lift_template_marks, {"context_suffix": ["m"]}, {"cp_context_suffix": ["m"]})
    with pytest.raises(InvalidBlocks) as info:
        read_blend_marks(lift_template_marks({}, {"cp_context_suffix": ["ok", ""]})[0])
    assert named_as_sent(str(info.value), {"cp_context_suffix": []}).startswith(
        "chat_template_kwargs.cp_context_suffix[1] is empty")
