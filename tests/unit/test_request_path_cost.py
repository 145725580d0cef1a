"""The request-path pieces made cheap for the API server keep their contracts:
``bind_args`` / ``read_args`` bind by name with cached signatures, and
``namespace_of`` keys message histories exactly as before (equal iff equal). The
eviction receiver's batching and idle poll are tested with the channel
(``test_channel.py``)."""
from __future__ import annotations

import pytest

from cp_engine.hooks.wrapping import bind_args
from cp_engine.pipeline import namespace_of


class _Serving:
    def create(self, request, raw_request=None, *, stream=False):
        return request


def test_bind_args_binds_bound_methods_and_functions_by_name_with_cached_signatures():
    obj = _Serving()
    for _ in range(2):  # second round: from the cache
        bound = bind_args(obj.create, ("req",), {"stream": True})
        assert dict(bound.arguments) == {"request": "req", "raw_request": None, "stream": True}
        # The same function unbound: ``self`` is a parameter again.
        plain = bind_args(_Serving.create, (obj, "req", "raw"), {})
        assert plain.arguments["self"] is obj and plain.arguments["raw_request"] == "raw"
    with pytest.raises(TypeError):
        bind_args(obj.create, (), {"nope": 1})

    def grown(request, extra, raw_request=None):
        return request

    assert bind_args(grown, ("a", "b"), {}).arguments["extra"] == "b"


def test_namespace_key_is_equal_for_equal_histories_and_differs_otherwise():
    a = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "hi"}]
    assert namespace_of([]) == ""
    assert namespace_of(a) == namespace_of([dict(reversed(list(m.items()))) for m in a])  # key order
    assert namespace_of(a) == namespace_of(tuple(a))
    different = [
        [{"role": "system", "content": "Answer"}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Answer.\x00"}, {"role": "user", "content": "hi"}],
        a[:1],
        a + [{"role": "assistant", "content": ""}],
        [{"role": "system:", "content": "x"}], [{"role": "system", "content": ":x"}],  # field boundaries
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],  # parts: the JSON fallback
        [{"role": "user", "content": "hi", "name": None}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "Answer."}],  # message order
    ]
    keys = [namespace_of(a)] + [namespace_of(d) for d in different]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    parts = [{"role": "user", "content": [{"text": "hi", "type": "text"}]}]
    assert namespace_of(parts) == namespace_of(different[6])  # sorted JSON: key order aside


def test_read_args_reads_what_bind_args_binds():
    from cp_engine.hooks.wrapping import read_args

    obj = _Serving()
    calls = [(("req",), {}), (("req", "raw"), {}), ((), {"request": "req", "raw_request": "raw"}),
             (("req",), {"raw_request": "raw", "stream": True})]
    for args, kwargs in calls * 2:
        want = bind_args(obj.create, args, kwargs).arguments
        assert read_args(obj.create, args, kwargs, ("request", "raw_request")) == \
            {"request": want["request"], "raw_request": want["raw_request"]}

    def star(first, *rest, request=None):
        return first

    assert read_args(star, (1, 2, 3), {}, ("request",)) == {"request": None}  # never taken from *rest
    with pytest.raises(TypeError):
        read_args(obj.create, ("req",), {}, ("missing",))
    with pytest.raises(TypeError):
        read_args(obj.create, (), {}, ("request",))
