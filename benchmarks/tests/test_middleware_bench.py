"""The middleware-cost benchmark drives the same streamed answer through every form."""
from __future__ import annotations

import asyncio

import pytest

from benchmarks.micro import middleware


def test_every_form_serves_the_same_stream_and_is_timed():
    us = asyncio.run(middleware._rounds(requests=5, rounds=2, chunks=3))
    assert set(us) == set(middleware.FORMS) and all(len(v) == 2 and min(v) > 0 for v in us.values())
    table = middleware.markdown({"chunks": 3, "requests": 5, "rounds": 2, "us": us})
    assert all(f"| {form} |" in table for form in middleware.FORMS)


def test_a_form_that_changes_the_answer_is_refused(monkeypatch):
    real = middleware._app

    def broken(form, chunks):
        return real(form, chunks + (form == "IndexView"))

    monkeypatch.setattr(middleware, "_app", broken)
    with pytest.raises(RuntimeError, match="answered differently"):
        asyncio.run(middleware._rounds(requests=1, rounds=1, chunks=2))
