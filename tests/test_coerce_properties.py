"""Property tests of the cell converters: any input either comes back exactly or is rejected with a reason —
never a changed value, never an exception."""

from __future__ import annotations

import datetime as dt
import json
import os
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from engagesim.loaders.coerce import MediaParseError, id_value, int_value, parse_media, time_value
from engagesim.schema import MEDIA_KINDS

INT64 = st.integers(-(2**63), 2**63 - 1)
ANY_CELL = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=40), st.decimals(allow_nan=False).map(str))
settings.register_profile("ci", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 300)), deadline=None)
settings.load_profile("ci")


@given(INT64)
def test_int_round_trips_as_int_and_as_text(n):
    assert int_value(n, "likes") == (n, None)
    assert int_value(str(n), "likes") == (n, None)
    assert int_value(f" {n} ", "likes") == (n, None)


@given(st.integers(2**63, 2**200), st.booleans())
def test_int_outside_int64_is_rejected(n, negative):
    value, reason = int_value(str(-n - 1 if negative else n), "likes")
    assert value is None and "out of range" in reason


@given(ANY_CELL)
def test_int_is_exact_or_rejected(cell):
    value, reason = int_value(cell, "likes")
    if value is None:
        return  # a blank, or a reject with its reason
    assert reason is None and -(2**63) <= value < 2**63
    if isinstance(cell, float):
        assert float(value) == cell and abs(cell) < 2**53  # a float is only trusted while it is exact
    elif isinstance(cell, str):
        assert Decimal(cell.strip()) == value
    else:
        assert value == cell and not isinstance(cell, bool)


@given(ANY_CELL)
def test_ids_are_text_unchanged_or_rejected(cell):
    value, reason = id_value(cell, "post_id")
    if isinstance(cell, str):
        assert value == cell and reason is None
    elif isinstance(cell, int) and not isinstance(cell, bool):
        assert value == str(cell)
    elif value is not None:  # a float id is accepted only where all its digits are certain
        assert isinstance(cell, float) and float(value) == cell and abs(cell) < 2**53
    else:
        assert cell is None or cell != cell or reason  # None and NaN are blanks


MOMENT = st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2099, 12, 31),
                      timezones=st.sampled_from([dt.timezone.utc, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                                                 dt.timezone(dt.timedelta(hours=-8))]))


def _us(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@given(MOMENT)
def test_times_round_trip_through_iso_text_and_datetime(moment):
    if _us(moment) < 0:
        return
    assert time_value(moment, "created_at") == (_us(moment), None)
    assert time_value(moment.isoformat(), "created_at") == (_us(moment), None)


@given(st.integers(0, 4_102_444_799))
def test_epochs_in_every_unit_mean_the_same_moment(seconds):
    if seconds < 10**8:  # 9+ digits are epochs; shorter digit strings are dates like 20240131
        return
    us = seconds * 1_000_000
    for value in (seconds, str(seconds), seconds * 1_000, seconds * 1_000_000):
        assert time_value(value, "created_at") == (us, None)


@given(ANY_CELL)
def test_time_is_in_range_or_rejected(cell):
    value, reason = time_value(cell, "created_at")
    assert (value is None) or (reason is None and 0 <= value < 4_102_444_800 * 1_000_000)
    if isinstance(cell, str) and cell.strip().lower() in {"now", "today", "yesterday", "tomorrow"}:
        assert value is None and "relative date" in reason


@given(st.times())
def test_a_time_without_a_date_is_rejected_not_dated_today(moment):
    assert time_value(moment.isoformat(), "created_at")[0] is None


MEDIA = st.lists(st.fixed_dictionaries({"kind": st.sampled_from(MEDIA_KINDS), "uri": st.text(min_size=1, max_size=30)}),
                 max_size=4)


@given(MEDIA)
def test_media_json_round_trips(items):
    assert parse_media(json.dumps(items)) == items
    assert parse_media(items) == items


@given(st.text(max_size=200))
def test_any_media_text_parses_or_is_rejected_with_a_reason(text):
    try:
        items = parse_media(text)
    except MediaParseError as exc:
        assert str(exc)
        return
    assert all(set(i) == {"kind", "uri"} and isinstance(i["uri"], str) and i["uri"] for i in items)


@given(st.lists(st.one_of(ANY_CELL, MOMENT.map(lambda m: m.isoformat()), INT64.map(str),
                          st.sampled_from(["2024-02-30", "2024-01-01T25:00:00Z", "9999-01-01", "1969-12-31T23:59:59Z"])),
                max_size=30))
def test_the_vectorised_columns_equal_the_cell_by_cell_rules(cells):
    """The fast paths (plain ints, ISO times) take whole columns at once: they must agree with the exact rules."""
    import numpy as np
    import pandas as pd

    from engagesim.loaders.coerce import to_int, to_timestamp

    series = pd.Series(cells, dtype=object)
    for column, rule in ((to_int, int_value), (to_timestamp, time_value)):
        reasons = np.full(len(cells), None, dtype=object)
        values = column(series, "x", reasons).cast("int64").to_pylist()
        expected = [rule(c, "x") for c in cells]
        assert values == [v for v, _ in expected]
        assert list(reasons) == [r for _, r in expected]
