"""Index lookups equal the left join they replace, on random tables: missing keys, null keys, one or two key
columns, the index plan and the join plan (no Ray)."""

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engagesim.features import lookup
from engagesim.features.lookup import KeyIndex, left_lookup

names = st.sampled_from(["a", "b", "c", "d", "e", None])


@st.composite
def table_and_keys(draw, two_keys: bool):
    n = draw(st.integers(0, 12))
    if two_keys:
        pairs = draw(st.lists(st.tuples(names, st.integers(0, 3)), min_size=n, max_size=n, unique=True))
        table = pl.DataFrame({"k": [p[0] for p in pairs], "j": [p[1] for p in pairs],
                              "v": [float(i) for i in range(len(pairs))], "w": [str(i) for i in range(len(pairs))]},
                             schema={"k": pl.String, "j": pl.Int64, "v": pl.Float64, "w": pl.String})
        wanted = draw(st.lists(st.tuples(names, st.integers(0, 4)), max_size=8))
        keys = pl.DataFrame({"k": [p[0] for p in wanted], "j": [p[1] for p in wanted],
                             "x": list(range(len(wanted)))}, schema={"k": pl.String, "j": pl.Int64, "x": pl.Int64})
        return table.filter(pl.struct("k", "j").is_first_distinct()), keys, ["k", "j"]
    values = draw(st.lists(names, max_size=n, unique=True))
    table = pl.DataFrame({"k": values, "v": [float(i) for i in range(len(values))]},
                         schema={"k": pl.String, "v": pl.Float64})
    keys = pl.DataFrame({"k": draw(st.lists(names, max_size=8))}, schema={"k": pl.String})
    return table, keys, ["k"]


@pytest.mark.parametrize("two_keys", [False, True])
@pytest.mark.parametrize("plan", ["index", "join"])
@pytest.mark.parametrize("with_extra", [False, True])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_lookup_equals_the_left_join(two_keys, plan, with_extra, data):
    table, keys, on = data.draw(table_and_keys(two_keys))
    extra = None
    if with_extra:  # rows with keys the table lacks, of a wider dtype (as a request's new posts may be)
        whole, _, _ = data.draw(table_and_keys(two_keys))
        extra = whole.join(table, on=on, how="anti").with_columns(pl.col("v").cast(pl.Float32) * 2 + 0.5)
        extra = extra.with_columns(pl.col("v").cast(pl.Int64)) if data.draw(st.booleans()) else extra
        extra = extra.with_columns(pl.col("v").cast(pl.Float64)) if data.draw(st.booleans()) else extra
        if extra.height and data.draw(st.booleans()):  # only keys of new rows (a new post scored alone)
            keys = extra.select(on)[data.draw(st.lists(st.integers(0, extra.height - 1), min_size=1, max_size=4))]
    old = lookup.INDEX_MAX_KEYS
    lookup.INDEX_MAX_KEYS = 10**6 if plan == "index" else -1
    lookup.indexed(table, on)
    try:
        got = left_lookup(keys, table, on, extra)
        alone = left_lookup(keys, table, on, extra, with_keys=False)
    finally:
        lookup.INDEX_MAX_KEYS = old
    both = table if extra is None else pl.concat([table, extra], how="vertical_relaxed")
    want = keys.join(both, on=on, how="left", maintain_order="left")
    assert got.schema == want.schema and got.equals(want), (got, want)
    assert alone.equals(want.drop(keys.columns))  # the table's columns only


def test_a_key_that_is_not_unique_is_refused():
    with pytest.raises(ValueError, match="not unique"):
        KeyIndex(pl.DataFrame({"k": ["a", "a"], "v": [1, 2]}), ["k"])


def test_only_marked_tables_are_indexed_once_and_dropped_with_them():
    import gc

    table, other = pl.DataFrame({"k": ["a", "b"], "v": [1, 2]}), pl.DataFrame({"k": ["a"], "v": [3]})
    assert lookup.index_of(other, ["k"]) is None  # unmarked: the join, never a build
    lookup.indexed(table, "k")
    first = lookup.index_of(table, ["k"])
    assert first is not None and lookup.index_of(table, ["k"]) is first
    before = len(lookup._INDEXES)
    del table
    gc.collect()
    assert len(lookup._INDEXES) == before - 1


@pytest.mark.parametrize("two_keys", [False, True])
@pytest.mark.parametrize("plan", ["index", "join"])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_lookup_columns_equal_the_left_join_filled(two_keys, plan, data):
    """The numpy lookup (history, target encodings, graph ids): the join's columns, nulls and misses filled."""
    import numpy as np

    table, keys, on = data.draw(table_and_keys(two_keys))
    times = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 2**52)), min_size=table.height,
                               max_size=table.height))
    table = table.with_columns(pl.Series("t", times, dtype=pl.Int64),  # v: a null and a NaN, both filled
                               pl.when(pl.col("v") > 3).then(float("nan")).when(pl.col("v") > 2).then(None)
                               .otherwise(pl.col("v")).alias("v"))
    old = lookup.INDEX_MAX_KEYS
    lookup.INDEX_MAX_KEYS = 10**6 if plan == "index" else -1
    lookup.indexed(table, on)
    try:
        got = lookup.lookup_columns(table, on, keys, ["v", "t"], {"v": 0.0, "t": np.nan})
    finally:
        lookup.INDEX_MAX_KEYS = old
    want = keys.join(table, on=on, how="left", maintain_order="left")
    assert np.array_equal(got["v"], want["v"].fill_null(0.0).fill_nan(0.0).to_numpy())
    t = want["t"].cast(pl.Float64).to_numpy()
    assert np.array_equal(got["t"], t, equal_nan=True)


def test_lookup_columns_refuse_a_table_that_is_not_unique():
    with pytest.raises(ValueError, match="not unique"):
        lookup.lookup_columns(pl.DataFrame({"k": ["a", "a"], "v": [1.0, 2.0]}), "k", pl.DataFrame({"k": ["a"]}),
                              ["v"], {"v": 0.0})
