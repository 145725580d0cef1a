"""The load bound on the data-parallel rank choice (hooks/vllm/dp_rank.py): requests in
flight per rank, admitted as ``LoadBound`` does, and released by the serving wrapper
(hooks/vllm/serving_patch.py) however the request ends."""
from __future__ import annotations

import asyncio
import gc
import math
import random
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from cp_engine.config import load_config
from cp_engine.hooks.vllm.dp_rank import _HELD, RankChoice, RankLoads, choose_rank, ranked_namespace, take_held
from cp_engine.hooks.vllm.serving_patch import make_wrapper
from cp_engine.index import ContextIndex
from cp_engine.scaleout.routing import LoadBound

HOT = [11, 12, 13, 14]


def _request(headers: dict | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw})


class Serving:
    """The serving object as the wrapper and ``dp_size`` read it."""

    def __init__(self, size: int):
        parallel = SimpleNamespace(data_parallel_size=size)
        self.engine_client = SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel))

    def create_error_response(self, message: str) -> "ErrorResponse":
        return ErrorResponse(message)


class ErrorResponse:  # matched by class name, as vLLM's is
    def __init__(self, message: str):
        self.message = message


def _hot_index(size: int, rank: int = 0) -> ContextIndex:
    index = ContextIndex()
    index.record("seen", HOT, namespace=ranked_namespace("", rank))
    return index


def _pin(loads: RankLoads, index: ContextIndex, ids=HOT, headers: dict | None = None) -> tuple[int, object]:
    """One request through ``RankChoice`` as the rewrites drive it: (rank, its count)."""
    req = _request(headers)
    choice = RankChoice.for_request(Serving(loads.size), req, index, loads)
    choice.namespace("", ids)
    choice.pin()
    assert req.headers["x-data-parallel-rank"] == str(choice.rank)
    return choice.rank, take_held(req)


def test_one_request_at_a_time_always_goes_to_the_cache():
    loads, index = RankLoads(2), _hot_index(2, rank=1)
    for _ in range(20):
        rank, held = _pin(loads, index)
        assert rank == 1
        held.release()
    assert loads.in_flight() == [0, 0]


@pytest.mark.parametrize("size,factor", [(2, 1.25), (4, 1.25), (3, 1.0), (2, 1.5)])
def test_skewed_traffic_stays_within_the_bound(size, factor):
    """Every request wants rank 0; with requests finishing at random, no chosen rank
    ever holds more than ceil(factor * n / size) of the n in flight."""
    loads, index, rng = RankLoads(size, factor), _hot_index(size), random.Random(size)
    running: list = []
    spilled = 0
    for _ in range(400):
        if running and rng.random() < 0.4:
            running.pop(rng.randrange(len(running))).release()
        rank, held = _pin(loads, index)
        running.append(held)
        spilled += rank != 0
        now = loads.in_flight()
        assert now[rank] <= math.ceil(factor * sum(now) / size), now
    assert spilled > 0
    for held in running:
        held.release()
    assert loads.in_flight() == [0] * size


def test_a_full_cache_best_rank_yields_to_the_next_best_aligned():
    index = ContextIndex()
    index.record("a", HOT, namespace=ranked_namespace("", 0))  # all 4 blocks
    index.record("b", HOT[:2], namespace=ranked_namespace("", 2))  # 2 of them
    loads = RankLoads(3, factor=1.0)
    held = [_pin(loads, index) for _ in range(3)]
    assert [rank for rank, _ in held] == [0, 2, 1]  # then rank 1, holding none
    assert choose_rank(index, HOT, "", 3, admissible=[1, 2]) == 2


def test_an_asked_rank_is_honoured_past_the_bound_and_counted():
    loads, index = RankLoads(2, factor=1.0), _hot_index(2)
    held = [_pin(loads, index, headers={"X-data-parallel-rank": "1"}) for _ in range(5)]
    assert [rank for rank, _ in held] == [1] * 5
    assert loads.in_flight() == [0, 5]
    assert _pin(loads, index)[0] == 0  # the chosen ones fill the idle rank first


def test_release_is_counted_once_and_a_dropped_count_is_released_when_collected():
    loads, index = RankLoads(2), _hot_index(2)
    _, held = _pin(loads, index)
    held.release()
    held.release()
    assert loads.in_flight() == [0, 0]
    _pin(loads, index)  # its count is dropped with the request, never released by hand
    gc.collect()
    assert loads.in_flight() == [0, 0]


def test_load_bound_release_refuses_what_it_never_counted():
    bound = LoadBound(2)
    bound.assign(1)
    bound.release(1)
    with pytest.raises(ValueError, match="no request"):
        bound.release(1)
    with pytest.raises(ValueError, match="windowed"):
        LoadBound(2, window=4).release(0)


def test_factor_flag_is_parsed_and_bad_values_fall_back_with_a_clear_warning():
    assert load_config({}).dp_load_factor == 1.25
    assert load_config({"CP_ENGINE_DP_LOAD_FACTOR": " 2 "}).dp_load_factor == 2.0
    for raw, says in [("0.5", "expected a number >= 1, got '0.5'"), ("nan", "expected a number >= 1"),
                      ("inf", "expected at most 64"), ("lots", "could not convert")]:
        cfg = load_config({"CP_ENGINE_DP_LOAD_FACTOR": raw})
        assert cfg.dp_load_factor == 1.25 and len(cfg.warnings) == 1
        warning = cfg.warnings[0]
        assert warning.startswith("CP_ENGINE_DP_LOAD_FACTOR: ") and says in warning, warning
        assert warning.endswith("using default 1.25")


# -- released however the request ends (the serving wrapper) -------------------------

_kept: list = []


class Stream:
    """An async generator of SSE chunks, as vLLM's streaming answer; records its close."""

    def __init__(self, chunks: list[str]):
        self.chunks, self.closed = chunks, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    async def aclose(self):
        self.closed = True


def _wrapped_call(loads: RankLoads, answer, keep: bool = True):
    """Run one request through ``make_wrapper`` with a rewrite that pins it; ``answer``
    is what vLLM's method does (returns, raises or waits). ``keep`` holds on to the
    count (as a traceback or a debugger might), so only an explicit release uncounts it."""
    index = _hot_index(loads.size)

    def rewrite(request, raw_request, serving):
        choice = RankChoice.for_request(serving, raw_request, index, loads)
        choice.namespace("", HOT)
        choice.pin()
        if keep:
            _kept.append(raw_request.scope[_HELD])
        return request.outcome

    async def create(request, raw_request=None):
        assert loads.in_flight() == [1, 0]  # counted while vLLM runs it
        return await answer()

    wrapper = make_wrapper("test_rewrite", rewrite)

    def call(outcome=None):
        return wrapper(create, Serving(loads.size), (SimpleNamespace(outcome=outcome), _request()), {})

    return call


def test_a_full_response_and_an_error_response_release_the_count():
    loads = RankLoads(2)

    async def full():
        return {"choices": []}

    async def error():
        return ErrorResponse("prompt too long")

    assert asyncio.run(_wrapped_call(loads, full)()) == {"choices": []}
    assert loads.in_flight() == [0, 0]
    assert isinstance(asyncio.run(_wrapped_call(loads, error)()), ErrorResponse)
    assert loads.in_flight() == [0, 0]


def test_an_exception_and_a_cancelled_request_release_the_count():
    loads = RankLoads(2)

    async def fails():
        raise RuntimeError("engine dead")

    with pytest.raises(RuntimeError):
        asyncio.run(_wrapped_call(loads, fails)())
    assert loads.in_flight() == [0, 0]

    async def client_leaves():
        started = asyncio.Event()

        async def waits():
            started.set()
            await asyncio.sleep(60)

        task = asyncio.ensure_future(_wrapped_call(loads, waits)())
        await started.wait()
        task.cancel()  # what vLLM does to a non-streamed request whose client left
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(client_leaves())
    assert loads.in_flight() == [0, 0]


def test_a_stream_releases_the_count_when_read_to_the_end_closed_or_dropped():
    loads = RankLoads(2)
    streams: list[Stream] = []

    async def stream():
        streams.append(Stream(["data: {\"id\": 1}\n\n", "data: [DONE]\n\n"]))
        return streams[-1]

    async def read_all():
        out = await _wrapped_call(loads, stream)()
        assert loads.in_flight() == [1, 0]  # still running while the client reads
        chunks = [chunk async for chunk in out]
        assert loads.in_flight() == [0, 0]  # at its end, not when collected
        return chunks

    assert len(asyncio.run(read_all())) == 2

    async def client_leaves_mid_stream():
        out = await _wrapped_call(loads, stream)()
        await out.__anext__()
        await out.aclose()  # the server closes the response generator on a disconnect
        assert loads.in_flight() == [0, 0] and streams[-1].closed

    asyncio.run(client_leaves_mid_stream())

    async def never_read():
        await _wrapped_call(loads, stream, keep=False)()  # the response is dropped unstarted

    asyncio.run(never_read())
    gc.collect()
    assert loads.in_flight() == [0, 0]


def test_a_rejected_rewrite_releases_what_it_pinned():
    loads = RankLoads(2)

    async def unused():
        raise AssertionError("a 400 never reaches vLLM")

    answer = asyncio.run(_wrapped_call(loads, unused)(outcome="cp_engine: bad blocks"))
    assert isinstance(answer, ErrorResponse)
    assert loads.in_flight() == [0, 0]
