"""Random and adversarial OpenAI payloads for the fuzzers (seeded, no hypothesis).

``payload(rng)`` returns ``Payload(endpoint, body, headers, raw)``: ``endpoint`` is
"chat" or "completion", ``body`` the JSON object to send (``raw`` bytes instead when
the case is a malformed body). The mix covers: wrong types,
huge / empty / duplicate blocks, unicode (astral, combining, RTL, NUL, lone
surrogates), 10k blocks, missing ids and messages, mixed and marked content parts,
odd conversation ids and headers. About a third are well-formed marked requests so
the rewrite path itself is exercised, not only the 400 path.

``classify(status, body_text)`` is the fuzzer's oracle: "ok" (200 with choices),
"error" (a 4xx whose body is a JSON error object), anything else is a "crash".
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Payload", "payload", "classify", "CASES"]

_WORDS = ("river", "lamp", "orbit", "cedar", "harbor", "signal", "meadow", "copper", "glacier", "ember")
_UNICODE = ("héllo wörld", "日本語のテキスト", "😀🚀👩‍👩‍👧", "مرحبا بالعالم", "e\u0301\u0302\u0303", "\u202eevil",
            "zero\u200bwidth", "nul\x00byte", "\ud800lone", "\U0010ffff", "tab\tnew\nline\r", "")
_JUNK: tuple[Any, ...] = (None, True, False, 0, -1, 2**70, 1.5, float("inf"), "", "x", [], {}, [None], {"a": 1},
                          [[["deep"]]], ["a", 1], {"text": "t"})


@dataclass
class Payload:
    endpoint: str
    body: Any
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None
    case: str = ""


def _text(rng: random.Random, words: int | None = None) -> str:
    n = rng.randint(1, 60) if words is None else words
    return " ".join(rng.choice(_WORDS) + str(rng.randrange(50)) for _ in range(n))


def _blocks(rng: random.Random, n: int | None = None) -> list[str]:
    n = rng.randint(1, 8) if n is None else n
    pool = [_text(rng) for _ in range(max(1, n // 2 + 1))]
    return [rng.choice(pool) if rng.random() < 0.3 else _text(rng) for _ in range(n)]


def _messages(rng: random.Random, question: Any = None) -> list[dict]:
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": "Answer from the documents."})
    for _ in range(rng.randint(0, 2)):
        msgs += [{"role": "user", "content": _text(rng, 5)}, {"role": "assistant", "content": _text(rng, 3)}]
    msgs.append({"role": "user", "content": question if question is not None else _text(rng, 6) + "?"})
    return msgs


def _chat(rng: random.Random, **extra: Any) -> dict:
    return {"messages": _messages(rng), "max_tokens": 1, "temperature": 0.0, **extra}


# -- cases: each returns (endpoint, body) or a Payload ------------------------------
def _valid_field(rng):
    extra = {"context_blocks": _blocks(rng)}
    if rng.random() < 0.5:
        extra["conversation_id"] = f"conv-{rng.randrange(20)}"
    return "chat", _chat(rng, **extra)


def _valid_parts(rng):
    parts = [{"type": "text", "text": b, "cp_block": True} for b in _blocks(rng)]
    parts.append({"type": "text", "text": _text(rng, 5) + "?"})
    if rng.random() < 0.3:
        rng.shuffle(parts)  # marked parts anywhere, question anywhere
    return "chat", {"messages": _messages(rng, parts), "max_tokens": 1}


def _valid_completion(rng):
    return "completion", {"prompt": _text(rng, 8), "context_blocks": _blocks(rng), "max_tokens": 1}


def _wrong_blocks_type(rng):
    return rng.choice(("chat", "completion")), {
        **(_chat(rng) if rng.random() < 0.5 else {"prompt": "q"}), "context_blocks": rng.choice(_JUNK[1:])}


def _wrong_block_items(rng):
    blocks: list[Any] = _blocks(rng)
    blocks.insert(rng.randrange(len(blocks) + 1), rng.choice(_JUNK))
    return "chat", _chat(rng, context_blocks=blocks)


def _wrong_conversation(rng):
    return "chat", _chat(rng, context_blocks=_blocks(rng), conversation_id=rng.choice(
        (None, 12, 12.5, True, [], {}, "", "x" * 300, "\x00", "../../etc/passwd", "日本")))


def _empty_blocks(rng):
    return "chat", _chat(rng, context_blocks=rng.choice(([], [""], ["", ""], [" "] * 5)))


def _duplicate_blocks(rng):
    b = _text(rng)
    return "chat", _chat(rng, context_blocks=[b] * rng.randint(2, 50), conversation_id="dup")


def _unicode_blocks(rng):
    blocks = [rng.choice(_UNICODE) * rng.randint(1, 20) for _ in range(rng.randint(1, 6))]
    return "chat", _chat(rng, context_blocks=blocks, conversation_id=rng.choice(_UNICODE) or "u")


def _huge_block(rng):
    return "chat", _chat(rng, context_blocks=[_text(rng, rng.choice((3000, 20000)))])


def _many_blocks(rng):
    n = rng.choice((500, 4097, 10000))
    return "chat", _chat(rng, context_blocks=[f"b{i % rng.choice((n, 7))}" for i in range(n)])


def _missing_messages(rng):
    body = _chat(rng, context_blocks=_blocks(rng))
    body.pop("messages") if rng.random() < 0.5 else body.update(messages=[])
    return "chat", body


def _no_user_turn(rng):
    return "chat", {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                    "context_blocks": _blocks(rng), "max_tokens": 1}


def _bad_messages(rng):
    msgs: Any = rng.choice((["not a dict"], [{"content": "no role"}], [{"role": "user"}],
                            [{"role": 5, "content": "x"}], [{"role": "user", "content": 7}],
                            [{"role": "user", "content": [{"type": "text"}]}], "just text", {"role": "user"}))
    return "chat", {"messages": msgs, "context_blocks": _blocks(rng), "max_tokens": 1}


def _mixed_parts(rng):
    parts: list[Any] = [
        {"type": "text", "text": _text(rng), "cp_block": True},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}, "cp_block": rng.random() < 0.5},
        {"type": "text", "text": 5, "cp_block": True},
        {"type": "text", "cp_block": True},
        {"type": "text", "text": "q", "cp_block": "yes"},
        {"type": "text", "text": "q"},
        {"type": "input_audio", "cp_block": True},
    ]
    rng.shuffle(parts)
    return "chat", {"messages": _messages(rng, parts[: rng.randint(1, len(parts))]), "max_tokens": 1}


def _both_marks(rng):
    parts = [{"type": "text", "text": b, "cp_block": True} for b in _blocks(rng)] + [{"type": "text", "text": "q"}]
    return "chat", {"messages": _messages(rng, parts), "context_blocks": _blocks(rng), "max_tokens": 1}


def _completion_odd_prompt(rng):
    prompt = rng.choice(([1, 2, 3], ["a", "b"], [[1, 2]], "", None, 5, {"a": 1}))
    return "completion", {"prompt": prompt, "context_blocks": _blocks(rng), "max_tokens": 1}


def _headers_only(rng):
    return Payload("chat", _chat(rng, context_blocks=_blocks(rng)), headers={
        "X-CP-Conversation-Id": rng.choice(("h-1", "x" * 400, "日本".encode().decode("latin-1"), "a b", "")),
        "X-Request-Id": rng.choice(("dup-id", "", "a" * 1000))}, case="headers")


def _odd_params(rng):
    return "chat", _chat(rng, context_blocks=_blocks(rng), max_tokens=rng.choice((0, -1, "x", 10**9)),
                         temperature=rng.choice((-1, "hot", None)), n=rng.choice((0, 2, -3)))


def _extra_junk_fields(rng):
    body = _chat(rng, context_blocks=_blocks(rng))
    body.update({"cp_block": True, "vllm_xargs": rng.choice(({"cp_path": "zz"}, {"cp_ns": 5}, "x", [1])),
                 "cache_salt": rng.choice(("", "t1", 5))})
    return "chat", body


def _raw_body(rng):
    raw = rng.choice((b"", b"{", b"[]", b"null", b'{"messages": [}', b'{"context_blocks": "\xff\xfe"}',
                      json.dumps({"messages": [{"role": "user", "content": "q"}], "context_blocks": ["a"]})[:-3].encode(),
                      b'{"a":' * 2000 + b"1" + b"}" * 2000))
    return Payload(rng.choice(("chat", "completion")), None, raw=raw, case="raw_body")


CASES: dict[str, tuple[float, Callable]] = {
    "valid_field": (6, _valid_field), "valid_parts": (3, _valid_parts), "valid_completion": (3, _valid_completion),
    "wrong_blocks_type": (3, _wrong_blocks_type), "wrong_block_items": (3, _wrong_block_items),
    "wrong_conversation": (3, _wrong_conversation), "empty_blocks": (2, _empty_blocks),
    "duplicate_blocks": (2, _duplicate_blocks), "unicode_blocks": (3, _unicode_blocks), "huge_block": (0.5, _huge_block),
    "many_blocks": (0.5, _many_blocks), "missing_messages": (1, _missing_messages), "no_user_turn": (1, _no_user_turn),
    "bad_messages": (2, _bad_messages), "mixed_parts": (3, _mixed_parts), "both_marks": (1, _both_marks),
    "completion_odd_prompt": (1.5, _completion_odd_prompt), "headers": (1, _headers_only),
    "odd_params": (1.5, _odd_params), "extra_junk_fields": (1, _extra_junk_fields), "raw_body": (1, _raw_body),
}
_NAMES = list(CASES)
_WEIGHTS = [CASES[n][0] for n in _NAMES]


def payload(rng: random.Random) -> Payload:
    name = rng.choices(_NAMES, _WEIGHTS)[0]
    out = CASES[name][1](rng)
    if isinstance(out, Payload):
        out.case = out.case or name
        return out
    endpoint, body = out
    return Payload(endpoint, body, case=name)


def classify(status: int, text: str) -> str:
    """"ok", "error" (a proper 4xx JSON error) or "crash" (anything else)."""
    try:
        body = json.loads(text)
    except ValueError:
        return "crash"
    if status == 200:
        return "ok" if isinstance(body, dict) and body.get("choices") else "crash"
    if 400 <= status < 500 and isinstance(body, dict) and ("error" in body or "detail" in body):
        return "error"
    return "crash"
