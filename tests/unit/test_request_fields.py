"""Reading a request's tenant fields and its answer's kind without pydantic's slow
``__getattr__`` miss path must give the same answers as plain attribute access."""
from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from cp_engine.hooks.tenant import tenant_key, tenant_of_request
from cp_engine.hooks.vllm.serving_patch import is_stream


class Declared(BaseModel):
    cache_salt: str | None = None
    user: str | None = None


class ExtraAllowed(BaseModel):
    model_config = ConfigDict(extra="allow")
    cache_salt: str | None = None


class ExtraIgnored(BaseModel):
    model_config = ConfigDict(extra="ignore")


class WithProperty(BaseModel):
    salt_source: str = "p"

    @property
    def cache_salt(self) -> str:
        return "from-property"


class Plain:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("request_obj, salt, user", [
    (Declared(cache_salt="s", user="u"), "s", "u"),
    (Declared(), None, None),
    (ExtraAllowed(cache_salt="s", user="extra-user"), "s", "extra-user"),
    (ExtraAllowed(), None, None),
    (ExtraIgnored(cache_salt="dropped", user="dropped"), None, None),
    (WithProperty(), "from-property", None),
    (Plain(cache_salt="s", user="u"), "s", "u"),
    ({"cache_salt": "s", "user": "u"}, "s", "u"),
])
def test_tenant_fields_read_like_attributes(request_obj, salt, user):
    assert tenant_of_request(None, request_obj) == tenant_key(None, salt, user)
    assert tenant_of_request(None, request_obj) == tenant_key(
        None, getattr(request_obj, "cache_salt", None) if not isinstance(request_obj, dict) else salt,
        getattr(request_obj, "user", None) if not isinstance(request_obj, dict) else user)


def test_a_pydantic_response_is_not_a_stream_and_an_async_generator_is():
    async def chunks():
        yield "data: {}"

    gen = chunks()
    try:
        assert is_stream(gen)
        assert not is_stream(Declared())
        assert not is_stream({"choices": []})
    finally:
        gen.aclose().close()  # never started: nothing to await
