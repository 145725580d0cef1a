"""The blend hints' parsing: EngineCore accepts only well-formed spans and never raises."""
import pytest

from cp_engine.request_hints import MAX_SPANS, SCOPE, SPANS, read_scope, read_spans, strip_reserved


def test_valid_spans_come_back_as_tuples():
    assert read_spans({SPANS: [[0, 4], [4, 9], [12, 13]]}, 13) == ((0, 4), (4, 9), (12, 13))


@pytest.mark.parametrize("raw", [
    [[0, 4], [3, 9]],          # overlapping
    [[4, 9], [0, 4]],          # unsorted
    [[0, 4], [5, 11]],         # past the prompt's end
    [[-1, 3]],                 # negative
    [[2, 2]],                  # empty span
    [[0, True]], [[0.0, 3]],   # not ints
    [[0, 1, 2]], ["ab"],       # not pairs
    "0,4", 7, [], None,
])
def test_invalid_spans_are_refused_without_raising(raw):
    assert read_spans({SPANS: raw}, 10) is None


def test_absent_spans_and_too_many_spans():
    assert read_spans(None, 10) is None and read_spans({}, 10) is None
    many = [[i, i + 1] for i in range(MAX_SPANS + 1)]
    assert read_spans({SPANS: many}, MAX_SPANS + 1) is None
    assert read_spans({SPANS: many[:-1]}, MAX_SPANS + 1) is not None


def test_scope_is_a_string_and_clients_cannot_set_it():
    assert read_scope({SCOPE: "tenant-a"}) == "tenant-a"
    assert read_scope({SCOPE: ["x"]}) == "" and read_scope(None) == ""
    assert strip_reserved({SCOPE: "forged", "temperature_hint": 1}) == {"temperature_hint": 1}
    assert strip_reserved(None) is None
