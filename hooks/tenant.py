"""Which tenant a request belongs to, for scoping per-conversation dedup state.

Conversations are keyed by ``(tenant, conversation_id)`` (``cp_engine.dedup``), so a
conversation id is only meaningful inside one tenant: a client that guesses or
copies another tenant's id reaches an empty conversation of its own, and can neither
read that tenant's rendered turns (replay) nor add to or push out its entries.

Contract: ``tenant_key(authorization, cache_salt, user)`` is an opaque string that
differs whenever any of the three differs, and is ``""`` when all are absent (one
shared anonymous tenant, as without the plugin's scoping). The inputs are:
- ``authorization``: the ``Authorization`` header value (the API key). Only a keyed
  BLAKE2b digest of it is kept, never the key itself;
- ``cache_salt``: vLLM's / SGLang's own per-tenant prefix-cache separator;
- ``user``: the OpenAI ``user`` field (client-chosen, so it only ever narrows scope).
Never raises; non-string values are ignored.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping  # (isinstance on the request path: typing's alias checks slower)
from typing import Any

__all__ = ["tenant_key", "tenant_of_request"]

_PERSON = b"cp_engine-tnt"  # domain separation: this digest is not reusable elsewhere


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def tenant_key(authorization: Any = None, cache_salt: Any = None, user: Any = None) -> str:
    parts = [_text(authorization), _text(cache_salt), _text(user)]
    if not any(parts):
        return ""
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    for p in parts:  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        data = p.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tenant_of_request(headers: Mapping[str, str] | None, fields: Any) -> str:
    """``tenant_key`` from HTTP headers and a request (attributes or a dict body)."""
    auth = None
    if headers is not None:
        try:
            auth = headers.get("authorization")
        except Exception:
            auth = None

    def field(name: str) -> Any:
        if isinstance(fields, Mapping):
            return fields.get(name)
        # A pydantic model keeps its declared fields in the instance dict and extra
        # fields in ``__pydantic_extra__``; reading those directly avoids
        # ``__getattr__``, whose miss path builds and raises an error every request.
        own = getattr(fields, "__dict__", None)
        if isinstance(own, dict) and name in own:
            return own[name]
        cls = type(fields)
        if hasattr(cls, "__pydantic_fields__") and not hasattr(cls, name):  # not a property
            extra = getattr(fields, "__pydantic_extra__", None)
            return extra.get(name) if isinstance(extra, dict) else None
        return getattr(fields, name, None)

    return tenant_key(auth, field("cache_salt"), field("user"))
