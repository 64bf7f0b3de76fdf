"""The fitted feature state (no Ray): what training learned survives save/load exactly, and applying it
to new rows gives what the pipeline gave its validation rows."""

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engagesim.features import post_fit
from engagesim.features.graph import GraphModel
from engagesim.features.graph_fit import fit_graph
from engagesim.features.state import PostState, Projection
from engagesim.features.temporal import temporal_features

UTC = dt.timezone.utc


def T(hours: float) -> dt.datetime:
    return dt.datetime(2021, 1, 4, tzinfo=UTC) + dt.timedelta(hours=hours)


def _posts(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 12)).astype(np.float32)
    return pl.DataFrame({
        "post_id": [f"p{i}" for i in range(n)], "author_id": [f"a{i % 7}" for i in range(n)],
        "username": [f"a{i % 7}" for i in range(n)], "company": [None if i % 3 else "acme" for i in range(n)],
        "created_at": [T(i) for i in range(n)], "language": ["en" if i % 4 else "fr" for i in range(n)],
        "likes": rng.integers(0, 500, n), **{c: rng.random(n).astype(np.float32) for c in (
            "n_chars", "n_words", "n_caps_words", "n_mentions", "n_hashtags", "n_urls", "mean_word_len",
            "n_questions", "n_exclaims", "n_media", "n_photo", "n_video", "n_gif")},
        "hashtags": [["sale"] if i % 2 else ["new", "sale"] for i in range(n)],
        "domains": [[] if i % 5 else ["x.com"] for i in range(n)],
    }).with_columns(pl.Series("text_emb", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 12)))


def test_post_state_roundtrip_is_exact(tmp_path):
    df = _posts(120)
    y = np.log1p(df["likes"].to_numpy().astype(float))
    train = np.arange(120) < 96
    state = PostState.fit(df, y, train, None, post_fit.PostOptions(10, 4, 5), has_likes=True)
    before = state.transform(df)
    state.save(str(tmp_path / "state"))
    after = PostState.load(str(tmp_path / "state"), snapshot="cutoff").transform(df)
    assert before.columns == after.columns
    assert before.drop("text_emb").equals(after.drop("text_emb"))  # bit-identical, PCA included
    assert {"te_author_id", "te_hashtags_top1", "text_pca_3", "text_cluster", "lang=en"} <= set(after.columns)
    latest = PostState.load(str(tmp_path / "state"))  # the default: the latest snapshot, as saved
    for key, stats in state.latest.items():
        assert {**latest.te_scalar, **latest.te_list}[key].table.equals(stats.table), key
    # A state saved before the hierarchical account mean makes no te_author_id_hier: its models never saw it,
    # and its account-mean member keeps serving the encoding it was evaluated with.
    import json

    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    assert meta.pop("hier_smoothing") == state.tables.stats["author_id"].smoothing
    (tmp_path / "state" / "state.json").write_text(json.dumps(meta))
    older = PostState.load(str(tmp_path / "state"), snapshot="cutoff").transform(df)
    assert "te_author_id_hier" in after.columns and "te_author_id_hier" not in older.columns


def test_the_latest_snapshot_counts_every_labelled_post_and_the_cutoff_one_only_training(tmp_path):
    """A run serves target encodings over every labelled post (an account whose posts all fell in the held-out
    latest rows is not served the global prior); its cutoff snapshot is what validation rows were given."""
    df = _posts(120).with_columns(pl.when(pl.col("author_id") == "a6").then(pl.lit("late"))
                                  .otherwise(pl.col("author_id")).alias("author_id"))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) < 96).then(pl.col("author_id").replace("late", "a5"))
                         .otherwise(pl.col("author_id")).alias("author_id"))
    level = pl.col("author_id").str.slice(-1).replace("e", "9").cast(pl.Int64)  # "late" → 9: authors differ
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 119).then(None)
                         .otherwise(10 ** (level % 4) + pl.col("likes") % 7).alias("likes"))
    y = np.log1p(df["likes"].fill_null(0).to_numpy().astype(float))
    train = np.arange(120) < 96
    state = PostState.fit(df, y, train, None, post_fit.PostOptions("auto", 4, 5), has_likes=True)
    state.save(str(tmp_path / "state"))
    latest, cutoff = (PostState.load(str(tmp_path / "state"), snapshot=s) for s in ("latest", "cutoff"))
    late = pl.DataFrame({"author_id": ["late"]})["author_id"]
    stats, first = latest.te_scalar["author_id"], cutoff.te_scalar["author_id"]
    labelled = df["likes"].is_not_null().to_numpy()
    mine = (df["author_id"] == "late").to_numpy() & labelled
    assert first.apply(late)[0] == pytest.approx(first.prior)  # never in training: the prior
    m, prior = stats.smoothing, float(y[labelled].mean())
    assert m < 1 and stats.prior == pytest.approx(prior)
    # its own held-out posts count, shrunk as the training rows' pseudo-count says (the scale the models learnt)
    assert stats.apply(late)[0] == pytest.approx((y[mine].sum() + prior * m) / (mine.sum() + m))
    assert abs(stats.apply(late)[0] - first.prior) > 0.5 and m == first.smoothing
    a0 = (df["author_id"] == "a0").to_numpy()
    assert stats.apply(pl.Series(["a0"]))[0] == pytest.approx(
        (y[a0 & labelled].sum() + prior * m) / ((a0 & labelled).sum() + m))
    # Everything else is the same state: the projections, clusters and languages are fit on training rows only.
    assert latest.transform(df).drop("te_author_id", "te_company", "te_language", *[
        c for c in latest.transform(df).columns if c.startswith("te_")]).equals(
        cutoff.transform(df).drop(*[c for c in cutoff.transform(df).columns if c.startswith("te_")]))


def test_projection_survives_fortran_ordered_components(tmp_path):
    """sklearn's PCA components are F-ordered; safetensors writes raw buffers, so this once came back
    transposed (served PCA features disagreed with training)."""
    from safetensors.numpy import load

    from engagesim.io import safe_bytes

    x = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)
    p = Projection.fit(x, 3)
    arrays = load(safe_bytes({"m": p.mean, "c": np.asfortranarray(p.components)}))
    assert np.array_equal(Projection(arrays["m"], arrays["c"], 0).apply(x), p.apply(x))


def test_projection_of_the_non_null_rows_equals_projecting_the_zero_filled_block():
    """Projections project only the rows that have an embedding; a null row gets the zero vector's projection,
    as when every row went through ``block_matrix`` (nulls as zeros)."""
    from engagesim.features.post_ops import block_matrix, valid_block

    rng = np.random.default_rng(4)
    p = Projection.fit(rng.normal(size=(200, 12)).astype(np.float32), 4)
    rows = [None if i % 3 else rng.normal(size=12).astype(np.float32).tolist() for i in range(40)]
    for case in (rows, [None] * 5, [r for r in rows if r is not None], []):
        df = pl.DataFrame({"emb": pl.Series(case, dtype=pl.Array(pl.Float32, 12))})
        got, want = p.apply_rows(*valid_block(df, "emb")), p.apply(block_matrix(df, "emb"))
        assert got.shape == want.shape == (len(case), 4)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_time_since_previous_post_uses_known_posts_not_the_batch():
    known = pl.DataFrame({"post_id": ["a", "b", "c"], "author_id": ["x", "x", "y"],
                          "created_at": [T(0), T(5), T(1)]})
    new = pl.DataFrame({"post_id": ["n1", "b"], "author_id": ["x", "x"], "created_at": [T(7), T(5)]})
    alone = temporal_features(new.head(1), None, known)
    together = temporal_features(new, None, known)
    assert alone["secs_since_prev_post"][0] == together["secs_since_prev_post"][0] == 2 * 3600
    assert together["secs_since_prev_post"][1] == 5 * 3600  # "b" itself is not its own previous post
    assert together["post_id"].to_list() == ["n1", "b"]  # caller's order kept


def test_graph_roundtrip_gives_identical_features(tmp_path):
    rows = [("u0", "c0"), ("u0", "c1"), ("u1", "c0"), ("u1", "c1"), ("u2", "c2"), ("u1", "c2")]
    d = pl.DataFrame({"user_id": [u for u, _ in rows], "creator_id": [c for _, c in rows],
                      "impression_at": [T(1)] * len(rows), "like_at": [T(1.1)] * len(rows),
                      "reply_at": [None] * len(rows), "retweet_at": [T(1.2)] * len(rows), "quote_at": [None] * len(rows),
                      "follows_creator": [True, False, True, True, False, True]},
                     schema_overrides={"reply_at": pl.Datetime("us", "UTC"), "quote_at": pl.Datetime("us", "UTC")})
    from engagesim.features import history

    model = fit_graph(history.with_labels_and_windows(d), jaccard_k=5)
    model.save(str(tmp_path / "graph"))
    loaded = GraphModel.load(str(tmp_path / "graph"))
    users, creators = pl.Series(["u0", "u2", "zz", "u1"]), pl.Series(["c1", "c0", "c0", "c2"])
    assert model.features(users, creators).equals(loaded.features(users, creators))
