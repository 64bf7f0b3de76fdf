"""Pure feature transforms on small hand-checked tables (no Ray)."""

import datetime as dt

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engagesim.features import encodings, history
from engagesim.features.graph_fit import fit_graph
from engagesim.features.image_stats import image_stats
from engagesim.features.temporal import temporal_features
from engagesim.features.text import text_features
from engagesim.schema import ENGAGEMENTS
from engagesim.synth.images import draw_image

UTC = dt.timezone.utc


def T(hours: float) -> dt.datetime:
    return dt.datetime(2021, 1, 4, tzinfo=UTC) + dt.timedelta(hours=hours)  # a Monday


def test_text_counts_lists_and_cleaning():
    df = pl.DataFrame({
        "post_id": ["1", "2"],
        "text": ["Watch rapper <mention> freestyle for over an HOUR <hyperlink> <hyperlink>",
                 "Hello @Bob! Is THIS great? #Fun #Tech https://www.x.com/a/b and https://y.org"],
        "company": ["independent", None],
    })
    out = text_features(df).to_dicts()
    a, b = out
    assert (a["n_mentions"], a["n_urls"], a["n_hashtags"], a["n_caps_words"]) == (1, 2, 0, 1)
    assert a["n_words"] == 7  # placeholders are not words
    assert a["clean_text"] == "watch rapper freestyle over hour independent"  # company appended (Adobe)
    assert (b["n_questions"], b["n_exclaims"], b["n_hashtags"]) == (1, 1, 2)
    assert b["hashtags"] == ["fun", "tech"] and b["mentions"] == ["bob"] and b["domains"] == ["x.com", "y.org"]
    assert b["clean_text"] == "hello great fun tech"  # stop words, urls, mentions, punctuation gone


def test_temporal_features():
    posts = pl.DataFrame({"post_id": ["a", "b", "c"], "author_id": ["x", "x", "y"],
                          "created_at": [T(30), T(26), T(0)]})
    users = pl.DataFrame({"user_id": ["x", "y"], "created_at": [T(-48), T(-24)]})
    out = temporal_features(posts, users).to_dicts()
    assert [r["post_id"] for r in out] == ["a", "b", "c"]  # caller's order kept
    assert out[0]["secs_since_prev_post"] == 4 * 3600 and out[1]["secs_since_prev_post"] is None
    assert out[0]["day_of_week"] == 1 and out[0]["hour"] == 6 and out[2]["day_of_week"] == 0
    assert out[0]["account_age_days"] == pytest.approx(78 / 24)


def test_fourier_and_signed_log():
    f = encodings.fourier_features(np.array([0.0, np.pi]), scales=2)
    assert f.shape == (2, 4)
    np.testing.assert_allclose(f[1], [0, 1, -1, 0], atol=1e-6)  # sin(pi), sin(pi/2), cos(pi), cos(pi/2)
    np.testing.assert_allclose(encodings.signed_log1p(np.array([-3.0, 0, np.e - 1])), [-np.log(4), 0, 1])


def test_one_hot_unknown_is_zero():
    out = encodings.one_hot(pl.Series(["en", "fr", None]), ["en", "es"], "lang")
    assert out.to_dicts() == [{"lang=en": 1, "lang=es": 0}, {"lang=en": 0, "lang=es": 0}, {"lang=en": 0, "lang=es": 0}]


@pytest.mark.parametrize("mode", ["oof", "past"])
def test_target_encoding_never_uses_own_label(mode):
    rng = np.random.default_rng(0)
    n = 400
    keys = pl.Series("k", rng.choice(["a", "b", "c"], n))
    y = rng.random(n)
    times = np.arange(n)
    base = encodings.target_encode_train(keys, y, times, mode, folds=4, smoothing=5)
    for i in (0, 57, 399):
        flipped = y.copy()
        flipped[i] = 1000.0
        # Changing row i's label may change other rows' encodings, never its own.
        assert encodings.target_encode_train(keys, flipped, times, mode, folds=4, smoothing=5)[i] == pytest.approx(base[i])


def test_past_target_encoding_ignores_the_future():
    keys = pl.Series("k", ["a"] * 4)
    te = encodings.target_encode_train(keys, np.array([1.0, 0, 0, 0]), np.arange(4), "past", smoothing=0.0001)
    assert te[1] == pytest.approx(1.0, rel=1e-3) and te[2] == pytest.approx(0.5, rel=1e-3)


def test_list_summary_top3_sum_mean():
    out = encodings.list_te_summary(np.array([0, 0, 0, 0, 2]), np.array([0.1, 0.4, 0.3, 0.2, 0.9]), 3, prior=0.5)
    np.testing.assert_allclose(out[0], [0.4, 0.3, 0.2, 1.0, 0.25, 4], rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.5, 0, 0, 0])  # no list elements → prior, zeros
    np.testing.assert_allclose(out[2][:4], [0.9, 0.5, 0.5, 0.9], rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.1, 0.2, 0.5, 1.5, -0.3])), max_size=20))
def test_list_summary_equals_a_row_by_row_reference(elements):
    """Shuffled rows, ties and rows without elements: each row's sorted top 3, sum, mean and count."""
    rows = np.array([r for r, _ in elements], dtype=np.int64)
    values = np.array([v for _, v in elements], dtype=np.float64)
    out = encodings.list_te_summary(rows, values, 6, prior=0.7)
    for r in range(6):
        mine = sorted((v for k, v in elements if k == r), reverse=True)
        top = (mine + [0.7] * 3)[:3]
        want = [*top, sum(mine), sum(mine) / len(mine) if mine else 0.0, len(mine)]
        np.testing.assert_allclose(out[r], np.float32(want), rtol=1e-6, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20)), max_size=25),
       st.lists(st.tuples(st.sampled_from(["a", "b", "d", None]), st.one_of(st.none(), st.integers(-2, 22))),
                min_size=1, max_size=24),
       st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.integers(-400, 400))),
                max_size=3, unique_by=lambda r: r[0]))
def test_previous_post_by_index_equals_the_as_of_join(known_rows, new_rows, account_rows):
    """A served post's previous post (binary search per account) is the batch's as-of join: strictly earlier
    posts only (ties excluded), unknown accounts and accounts without an earlier post get null. A few posts'
    whole temporal row (``temporal.few_rows``: day, hour, month, account age — made before or after the post,
    unknown or null) equals the frame path's. The row-by-row search and the all-rows bisection (more than
    ``temporal._LOOP_ROWS`` rows) agree."""
    from engagesim.features.lookup import KeyIndex
    from engagesim.features.temporal import AccountsCreated, PreviousPosts, earlier_posts

    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    def at(h):  # ~40 days apart at most: days of the week, hours and months all change
        return None if h is None else base + dt.timedelta(hours=37 * h, seconds=0.5 * h, microseconds=h * h)

    def frame(rows, prefix):
        return pl.DataFrame({"post_id": [f"{prefix}{i}" for i in range(len(rows))], "author_id": [a for a, _ in rows],
                             "created_at": [at(h) for _, h in rows]},
                            schema={"post_id": pl.String, "author_id": pl.String,
                                    "created_at": pl.Datetime("us", "UTC")})

    known, new = frame(known_rows, "k"), frame(new_rows, "n")
    accounts = pl.DataFrame({"author_id": [a for a, _ in account_rows],
                             "_account_created": [at(h) for _, h in account_rows]},
                            schema={"author_id": pl.String, "_account_created": pl.Datetime("us", "UTC")})
    earlier = earlier_posts(known)
    joined = temporal_features(new, None, known, earlier=earlier)
    indexed = temporal_features(new, None, known, earlier=earlier, previous=PreviousPosts(earlier))
    assert joined.equals(indexed), (joined, indexed)
    previous, times = PreviousPosts(earlier), new["created_at"].dt.epoch("us").to_list()
    assert previous._before_loop(new["author_id"].to_list(), times) == \
        previous._before_vectorised(new["author_id"].to_list(), times)
    joined = temporal_features(new, None, known, earlier=earlier, accounts=accounts)
    few = temporal_features(new, None, known, earlier=earlier, accounts=accounts, previous=PreviousPosts(earlier),
                            created=AccountsCreated(accounts, KeyIndex(accounts, ["author_id"])))
    assert joined.equals(few), (joined, few)
    assert few.schema == joined.schema


def _impressions(rows):
    df = pl.DataFrame(rows, schema=["user_id", "creator_id", "impression_at", "like_at"], orient="row")
    df = df.with_columns(pl.concat_str(pl.lit("p_"), pl.col("creator_id")).alias("post_id"))
    df = df.with_columns(pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias(c) for c in ("reply_at", "retweet_at", "quote_at"))
    df = df.with_columns(pl.col("impression_at", "like_at").cast(pl.Datetime("us", "UTC")), pl.lit(True).alias("follows_creator"))
    return history.with_labels_and_windows(df)


def test_history_windows_and_past_mode():
    rows = [("a", "x", T(1), T(1.1)), ("a", "x", T(25), None), ("a", "x", T(49), T(49.1)), ("b", "x", T(2), None)]
    d = _impressions(rows)
    window = history.history_features(d, "window").to_dicts()
    past = history.history_features(d, "past").to_dicts()
    # window mode: every other 24h window of the same user (its own window never counts)
    assert [r["user_like_count"] for r in window] == [1, 2, 1, 0]
    assert [r["user_n"] for r in window] == [2, 2, 2, 0]
    # past mode: only earlier windows
    assert [r["user_like_count"] for r in past] == [0, 1, 1, 0]
    assert past[2]["user_like_secs_since_last"] == 48 * 3600
    assert past[0]["user_like_secs_since_last"] is None
    # The post's own history is past-only even in window mode: a post's later windows are its own future.
    assert [r["post_like_count"] for r in window] == [r["post_like_count"] for r in past] == [0, 1, 1, 0]


def test_planted_future_engagement_does_not_change_past_features():
    rows = [("a", "x", T(1), None), ("a", "x", T(30), T(30.1)), ("a", "y", T(50), None)]
    before = history.history_features(_impressions(rows), "past")
    planted = rows + [("a", "x", T(80), T(80.5))]  # a future like
    after = history.history_features(_impressions(planted), "past").head(3)
    assert before.equals(after)


def test_graph_features():
    rows = []
    # users u0,u1 engage with creators c0,c1; u2 with c2 only
    for u, c in [("u0", "c0"), ("u0", "c1"), ("u1", "c0"), ("u1", "c1"), ("u2", "c2"), ("u1", "c2")]:
        rows.append((u, c, T(1), T(1.1)))
    d = _impressions(rows)
    model = fit_graph(d, jaccard_k=5, community_folds=1)  # one labelling: six edges are too few to split in folds
    f = model.features(pl.Series(["u0", "u2", "zz"]), pl.Series(["c1", "c0", "c0"])).to_dicts()
    assert f[0]["cf_similarity"] > f[1]["cf_similarity"]  # c1 is like what u0 engages with; c0 less so for u2
    assert f[2]["cf_similarity"] == 0 and f[2]["same_community_like"] == 0  # unknown user: cold start, no crash
    assert f[0]["same_community_like"] == 1 and 0 < f[0]["inv_community_size_like"] <= 1


def test_graph_fit_from_parts_equals_the_string_sorted_edge_list():
    """The fit codes each edge part's keys as it reads it (no frame of every edge's strings): users must come out
    in sorted order and creators in order of first appearance of the (user_id, creator_id)-sorted edge list —
    the ids every other feature indexes by — and parts that repeat a pair (the in-process executor's blocks)
    must sum like one frame. Checked against that order built directly from the strings, parts in any order."""
    from engagesim.features.graph_fit import coded_edges, fit_graph_from_pairs

    rng = np.random.default_rng(3)
    n = 4_000
    frame = pl.DataFrame({"user_id": [f"u{x}" for x in rng.integers(0, 600, n)],
                          "creator_id": [f"c{x}" for x in rng.integers(0, 90, n)],
                          **{f"c_{e}": rng.poisson(0.3, n).astype(float) for e in ENGAGEMENTS},
                          "follows": (rng.random(n) < 0.2).astype(np.int8)})
    edges = (frame.group_by("user_id", "creator_id").agg(*[pl.col(f"c_{e}").sum() for e in ENGAGEMENTS],
                                                         pl.col("follows").max())
             .filter(pl.any_horizontal(*[pl.col(f"c_{e}") > 0 for e in ENGAGEMENTS], pl.col("follows") > 0))
             .sort("user_id", "creator_id"))
    # Parts that share users (summed again after concatenation), and parts by user (the Ray path: final per part).
    by_user = frame.with_columns(part=pl.col("user_id").hash(seed=1) % 4).partition_by("part", include_key=False)
    for parts in ([frame[i::4] for i in (2, 0, 3, 1)], by_user[::-1]):
        users, creators, table = coded_edges(parts)
        assert users.to_list() == edges["user_id"].unique(maintain_order=True).to_list()
        assert creators.to_list() == edges["creator_id"].unique(maintain_order=True).to_list()
        assert users.gather(table["u"]).to_list() == edges["user_id"].to_list()
        assert creators.gather(table["c"]).to_list() == edges["creator_id"].to_list()
        for e in ENGAGEMENTS:
            assert table[f"c_{e}"].to_list() == edges[f"c_{e}"].to_list()
        assert table["follows"].to_list() == edges["follows"].to_list()
    whole, parted = fit_graph_from_pairs(frame, 5, max_edges=None), fit_graph_from_pairs(
        iter([frame[i::3] for i in range(3)]), 5, max_edges=None)
    for name in ("engaged", "creator_co", "jaccard_top"):
        assert (getattr(whole, name) != getattr(parted, name)).nnz == 0
    for e in ENGAGEMENTS:
        assert np.array_equal(whole.communities[e], parted.communities[e])
    assert len(fit_graph_from_pairs([], 5).users) == 0  # no parts: an empty graph


def test_leiden_above_its_edge_cap_runs_on_a_user_sample_and_assigns_the_rest():
    """Planted communities (4 groups of 60 users × 6 creators, 5 % noise edges): with the cap at a third of the
    edges, Leiden sees only a share of the users, every user and creator still gets a community, the left-out
    users land in their creators' community, and the result is the same on a second call (the seed)."""
    from unittest import mock

    import igraph

    from engagesim.features import graph_fit as g

    rng = np.random.default_rng(5)
    users, creators = [], []
    for u in range(240):
        group = u // 60
        for c in rng.choice(6, 4, replace=False):
            users.append(u)
            creators.append(group * 6 + c if rng.random() > 0.05 else rng.integers(0, 24))
    users, creators = np.array(users), np.array(creators)
    n_edges = len(np.unique(np.column_stack([users, creators]), axis=0))
    seen = []
    real = igraph.Graph

    def spy(*args, **kwargs):
        seen.append(len(kwargs["edges"]))
        return real(*args, **kwargs)

    with mock.patch.object(igraph, "Graph", side_effect=spy):
        full, _ = g._leiden(users, creators, 240, 24, seed=0, max_edges=None)
        capped, sizes = g._leiden(users, creators, 240, 24, seed=0, max_edges=n_edges // 3)
    assert seen[0] == n_edges and seen[1] <= n_edges // 2  # the capped fit saw a user sample's edges only
    assert (capped >= 0).all()  # every user and creator has a community
    np.testing.assert_array_equal(capped, g._leiden(users, creators, 240, 24, seed=0, max_edges=n_edges // 3)[0])
    group = np.r_[np.arange(240) // 60, np.arange(24) // 6]
    for labels in (full, capped):  # both recover the planted groups (pairs in one group share a community)
        same = labels[:, None] == labels[None, :]
        planted = group[:, None] == group[None, :]
        assert (same == planted).mean() > 0.95
    np.testing.assert_array_equal(sizes[capped], [np.sum(capped == x) for x in capped])


def test_top_k_jaccard_by_blocks_equals_brute_force():
    """Each creator's k most Jaccard-similar creators (ties: the lower index), computed 7 creators at a time,
    equal a dense brute force; small follower sets make many ties."""
    import scipy.sparse as sp

    from engagesim.features.graph_fit import _top_k_jaccard

    rng = np.random.default_rng(4)
    dense = (rng.random((30, 25)) < 0.12).astype(np.float32)  # 30 creators × 25 users
    dense[5] = 0  # a creator nobody follows
    inter = dense @ dense.T
    size = dense.sum(axis=1)
    k = 4
    want = np.zeros((30, 30), np.float32)
    for r in range(30):
        cands = [(-(inter[r, c] / (size[r] + size[c] - inter[r, c])), c) for c in range(30) if c != r and inter[r, c]]
        for _, c in sorted(cands)[:k]:
            want[r, c] = 1
    for block in (7, 1000):
        got = _top_k_jaccard(sp.csr_matrix(dense), k, block=block).toarray()
        np.testing.assert_array_equal(got, want)
    assert want.sum() > 30  # the case is not trivial


def test_image_stats_follow_latents():
    rng = np.random.default_rng(1)
    props = rng.random((80, 5))
    feats = np.array([image_stats(draw_image(p, 96, np.random.default_rng(i))) for i, p in enumerate(props)])
    corr = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    assert corr(props[:, 1], feats[:, 2]) > 0.4  # contrast → brightness contrast
    assert corr(props[:, 2], feats[:, 1]) > 0.3  # hue latent → hue count
    assert corr(props[:, 3], feats[:, 0]) > 0.4  # clutter/texture → clarity (high frequencies)
    assert feats[:, 3].min() >= 0 and feats[:, 3].max() <= 9  # entropy of 512 bins, in bits


def test_hsv_equals_colorsys_on_every_kind_of_pixel():
    """The vectorised HSV (picked per pixel from each sector's formula) is the standard library's, ties and
    greys included: the sector choice is where a vectorised rewrite goes wrong."""
    import colorsys

    from engagesim.features.image_stats import _hsv

    rng = np.random.default_rng(5)
    ties = [(v, v, w) for v, w in rng.integers(0, 256, (40, 2))] + [(v, w, w) for v, w in rng.integers(0, 256, (40, 2))]
    ties += [(w, v, w) for v, w in rng.integers(0, 256, (40, 2))] + [(0, 0, 0), (255, 255, 255), (7, 7, 7)]
    pixels = np.array([*rng.integers(0, 256, (400, 3)).tolist(), *[list(map(int, t)) for t in ties]], dtype=np.uint8)
    hue, sat, val = (a.ravel() for a in _hsv(pixels.reshape(1, -1, 3)))
    want = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels.astype(np.float64)])
    np.testing.assert_allclose(np.column_stack([hue, sat, val]), want, rtol=0, atol=1e-12)


def test_cf_similarity_leaves_the_pair_out():
    """The CF score of (u, c) equals a brute-force cosine CF on the graph with the (u, c) edge removed."""
    rng = np.random.default_rng(3)
    edges = {(f"u{u}", f"c{c}") for u, c in zip(rng.integers(0, 12, 60), rng.integers(0, 8, 60))}
    model = fit_graph(_impressions([(u, c, T(1), T(1.1)) for u, c in sorted(edges)]), jaccard_k=3)
    users, creators = list(model.users.keys), list(model.creators.keys)
    dense = model.engaged.toarray()

    def brute(ui: int, ci: int) -> float:
        e = dense.copy()
        e[ui, ci] = 0
        others = [k for k in np.flatnonzero(e[ui]) if k != ci]
        norm = np.sqrt(e.sum(axis=0))
        sims = [e[:, ci] @ e[:, k] / (norm[ci] * norm[k]) if norm[ci] * norm[k] else 0.0 for k in others]
        return float(np.mean(sims)) if sims else 0.0

    pairs = [(ui, ci) for ui in range(len(users)) for ci in range(len(creators))]
    got = model.features(pl.Series([users[u] for u, _ in pairs]), pl.Series([creators[c] for _, c in pairs]))
    want = np.array([brute(u, c) for u, c in pairs])
    np.testing.assert_allclose(got["cf_similarity"].to_numpy(), want, atol=1e-5)
    # Engagements with c's Jaccard neighbours, as the sparse product it is (c itself is no neighbour of c).
    jaccard = model.jaccard_top.toarray()
    assert not np.diag(jaccard).any()
    similar = [dense[u] @ jaccard[c] for u, c in pairs]
    np.testing.assert_array_equal(got["similar_creators_engaged"].to_numpy(), np.float32(similar))
    # One pair alone (a served request) gets what it gets among all the others.
    for k in (0, 7, len(pairs) - 1):
        one = model.features(pl.Series([users[pairs[k][0]]]), pl.Series([creators[pairs[k][1]]]))
        assert one.row(0) == got.row(k)
    # The pair's own edge does not move its score: only the edge changes between these two models.
    u, c = next((u, c) for u, c in pairs if dense[u, c])
    without = fit_graph(_impressions([(a, b, T(1), T(1.1)) for a, b in sorted(edges)
                                      if (a, b) != (users[u], creators[c])]), jaccard_k=3)
    score = lambda m: m.features(pl.Series([users[u]]), pl.Series([creators[c]]))["cf_similarity"][0]  # noqa: E731
    assert abs(score(model) - score(without)) < 1e-6


def test_empirical_bayes_smoothing_recovers_the_variance_ratio():
    """Keys with means ~ N(0, τ²) and rows ~ N(mean, σ²): the pseudo-count is σ²/τ² (here 0.25 and 16)."""
    rng = np.random.default_rng(0)
    for tau, sigma, want in ((2.0, 1.0, 0.25), (0.25, 1.0, 16.0)):
        keys = np.repeat(np.arange(3000), 8)
        y = rng.normal(0, tau, 3000)[keys] + rng.normal(0, sigma, len(keys))
        got = encodings.empirical_bayes_smoothing(pl.Series("k", keys.astype(str)), y)
        assert want * 0.8 < got < want * 1.25, (tau, sigma, got)
    # No between-key variance at all: as much smoothing as allowed (every key is the prior).
    keys = pl.Series("k", np.repeat(np.arange(200), 5).astype(str))
    assert encodings.empirical_bayes_smoothing(keys, np.zeros(1000)) == 1000.0
    stats = encodings.fit_target_stats(pl.Series("k", ["a", "a", "b", "b"]), np.array([1.0, 1.2, 5.0, 5.2]), "auto")
    assert stats.smoothing < 0.1 and abs(stats.apply(pl.Series(["a"]))[0] - 1.1) < 0.1


def test_author_reach_leaves_the_post_out_and_waits_for_exposure():
    from engagesim.features.reach import AuthorReach, impressions_per_post

    hour = 3_600_000_000
    origin = int(pl.Series([T(0)]).dt.epoch("us")[0])
    posts = pl.DataFrame({"post_id": ["p1", "p2", "p3", "p4", "p5"], "author_id": ["a", "a", "a", "b", "b"],
                          "created_at": [T(0), T(1), T(90), T(0), T(2)]})
    # Impressions: p1 ×3, p2 ×7 before the cutoff (hour 100) and p2 ×50 after it; p4 ×1.
    shown = ["p1"] * 3 + ["p2"] * 7 + ["p2"] * 50 + ["p4"]
    times = [T(5)] * 10 + [T(120)] * 50 + [T(5)]
    batch = pl.DataFrame({"post_id": shown, "impression_at": times}).to_arrow()
    counts = pl.from_arrow(impressions_per_post(batch, origin + 100 * hour))
    assert dict(counts.sort("post_id").iter_rows()) == {"p1": 3, "p2": 7, "p4": 1}
    reach = AuthorReach.fit(posts, counts, origin + 100 * hour, exposure_hours=24)
    # p3 (posted 10 h before the cutoff) is not exposed; p5 drew no impressions (log1p 0).
    got = reach.features(pl.concat([posts, pl.DataFrame({"post_id": ["new"], "author_id": ["a"],
                                                        "created_at": [T(130)]})])).to_dicts()
    l3, l7, l1 = np.log1p(3), np.log1p(7), np.log1p(1)
    assert got[0]["author_reach_posts"] == 1 and abs(got[0]["author_reach_log_impressions"] - l7) < 1e-6  # p1: p2 only
    assert abs(got[1]["author_reach_log_impressions"] - l3) < 1e-6  # p2: p1 only, never its own 7
    assert got[2]["author_reach_posts"] == 2 and abs(got[2]["author_reach_log_impressions"] - (l3 + l7) / 2) < 1e-6
    assert abs(got[3]["author_reach_log_impressions"] - 0.0) < 1e-6 and abs(got[4]["author_reach_log_impressions"] - l1) < 1e-6
    assert got[5]["author_reach_posts"] == 2  # a new post of a known author: all its exposed posts
    lonely = AuthorReach.fit(posts.head(1), counts, origin + 100 * hour, 24).features(posts.head(1)).to_dicts()[0]
    assert lonely["author_reach_posts"] == 0 and lonely["author_reach_log_impressions"] is None


def test_graph_task_on_a_log_without_training_engagements(tmp_path):
    """No edge parts (nothing engaged or followed before the cutoff): the task fits, saves and loads an empty
    graph whose features are all defined, instead of failing the stage."""
    from engagesim.features.graph import GraphModel
    from engagesim.pipeline.partitioned import _graph_task

    graph, seconds = _graph_task(str(tmp_path / "edges"), str(tmp_path / "graph"), None, 20, 0)
    assert seconds >= 0
    loaded = GraphModel.load(str(tmp_path / "graph"))
    feats = loaded.features(pl.Series(["u1", "u2"]), pl.Series(["c1", "c1"]))
    assert feats.height == 2
    assert feats.equals(graph.features(pl.Series(["u1", "u2"]), pl.Series(["c1", "c1"])))


_TEXT_PIECES = ["Hello", "WORLD", "DON'T", "x", "42", "a1", "_", " ", "  ", "\t", "\n", "\x0b", "\x0c", "\x1c", "\x1f",
                "#", "#Tag", "#2021", "@", "@Bob_1", "<mention>", "<hyperlink>", "http://", "https://www.Ex.com/p?q=1",
                "http://a.b/c", "https://", "www.", "!", "?", ".", ",", "'", "-", "the", "and", "el", "é", "É", "😀",
                "❤\ufe0f", "👩\u200d💻", "ß", "İ", "\u00a0", "\u2003", "ΣΑΣ", "day", "²", "٣", "ǅ", "ﬁ", "\u0301"]
_TEXT = st.lists(st.sampled_from(_TEXT_PIECES) | st.text(max_size=3), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_TEXT | st.none(), st.sampled_from([None, "", "Acme", "  Acme Co ", "Café", "ΣΑΣ"]) | _TEXT),
                min_size=1, max_size=4))
def test_text_features_of_few_rows_equal_the_polars_path(rows):
    """A served request's text features go through Python's re where every character is one both engines treat
    alike, a block's through polars. Arbitrary Unicode, whitespace the engines class differently (\\x1c-\\x1f),
    combining marks, emoji sequences, final sigma, placeholders, URLs and companies: the same frame either way."""
    from engagesim.features import text

    posts = pl.DataFrame({"post_id": [str(i) for i in range(len(rows))], "text": [t for t, _ in rows],
                          "company": [c for _, c in rows]}, schema={"post_id": pl.String, "text": pl.String,
                                                                     "company": pl.String})
    assert text.text_features(posts).equals(text._text_polars(posts))
    if text._is_few_agreed(posts):
        assert text._text_rows(posts).equals(text._text_polars(posts))


def test_the_python_text_path_takes_everyday_text_and_refuses_what_the_engines_class_differently():
    from engagesim.features import text

    def agreed(value: str) -> bool:
        return text._is_few_agreed(pl.DataFrame({"post_id": ["p"], "text": [value], "company": [None]},
                                                schema={"post_id": pl.String, "text": pl.String, "company": pl.String}))

    for everyday in ("Big launch today! #NewThings @acme https://www.acme.com/x", "Café crème à 3€ ☕ 😀",
                     "Grüße aus München", "日本語のテキスト", "Привет, мир!"):
        assert agreed(everyday), everyday
    for differs in ("a\x1cb", "❤\ufe0f", "e\u0301", "ΣΑΣ"):
        assert not agreed(differs), differs


_MEDIA_ITEM = st.none() | st.fixed_dictionaries({"kind": st.sampled_from(["photo", "video", "gif", "doc", None]),
                                                 "uri": st.sampled_from(["a", "b", None])})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.lists(_MEDIA_ITEM, max_size=4), min_size=1, max_size=6))
def test_media_counts_of_few_rows_equal_the_polars_path(media):
    """A served post's media counts and first photo are taken in Python, a block's through polars list
    expressions: the same frame for null lists, empty lists, null items, unknown kinds and null URIs."""
    import pyarrow as pa

    from engagesim.features import post
    from engagesim.schema import MEDIA_ITEM

    df = pl.from_arrow(pa.table({"media": pa.array(media, pa.list_(MEDIA_ITEM))}))
    assert post._media_rows(df).equals(post._media_polars(df))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_TEXT | st.none(), st.sampled_from([None, "", "Acme", "Café"]),
                          st.lists(_MEDIA_ITEM.filter(lambda m: m is not None), max_size=3)), min_size=1, max_size=4))
def test_post_row_features_of_few_rows_equal_the_polars_path(rows):
    """A served request's posts get their row-local features in Python and Arrow (no polars frame), a block's
    through polars: the same table — values and column types — wherever the engines agree on the text."""
    import datetime as dt

    import pyarrow as pa

    from engagesim.features import post
    from engagesim.schema import POSTS

    when = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    table = pa.Table.from_pylist([{"post_id": f"p{i}", "author_id": "a", "username": "a", "company": company,
                                   "created_at": when, "language": "en", "likes": i, "text": text, "media": media}
                                  for i, (text, company, media) in enumerate(rows)], schema=POSTS)
    few = post._few_rows(table)
    if few is not None:
        assert few.equals(post._polars_rows(table))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.floats(0.01, 0.6), st.integers(1, 200))
def test_cooccurrence_lookups_of_a_few_queries_equal_the_bisection(seed, size, density, queries):
    """``GraphModel._co_at`` answers a served pair's few queries one searchsorted at a time, a block's by a
    vectorised bisection: the same values (present entries, absent ones, empty rows, the last column)."""
    import scipy.sparse as sp

    from engagesim.features import graph

    rng = np.random.default_rng(seed)
    co = sp.random(size, size, density=density, format="csr", random_state=rng, dtype=np.float64)
    co.sort_indices()
    rows, cols = rng.integers(0, size, queries), rng.integers(0, size, queries)
    dense = co.toarray()[rows, cols]
    few, kept = graph._co_few(co, rows, cols), graph.FEW_QUERIES
    try:
        graph.FEW_QUERIES = -1  # the bisection at any size
        bisected = graph.GraphModel._co_at(co, rows, cols)
    finally:
        graph.FEW_QUERIES = kept
    np.testing.assert_array_equal(few, dense)
    np.testing.assert_array_equal(bisected, dense)


def test_importing_the_graph_features_leaves_igraph_to_the_fit():
    """igraph imports matplotlib (0.45 s of 1.3 s); every Ray worker, CLI command and Serve replica that reads
    graph features imports this module, and only the Leiden fit needs igraph."""
    import subprocess
    import sys

    code = "import sys, engagesim.features.graph; print('igraph' in sys.modules, 'matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def _pair_columns(model, user: str, creator: str, columns: list[str]) -> tuple:
    return model.features(pl.Series([user]), pl.Series([creator])).select(columns).row(0)


def test_community_folds_keep_a_pairs_own_edge_out_of_its_community_features(tmp_path):
    """With features.community_folds=2 (the default), a pair's same_community / inv_community_size read a Leiden labelling fit
    without its own edge: removing that edge from the log leaves them unchanged (with one labelling, a user with
    few edges is put in a creator's community by the very engagement the row is labelled with). Saved and loaded
    back, the model gives the same features; a model of one labelling still loads as before."""
    from engagesim.features.graph import GraphModel

    rng = np.random.default_rng(0)  # 60 users, 12 creators, ~2.4 edges a user: sparse, as the foreign worlds
    edges = sorted({(f"u{u:02d}", f"c{rng.integers(0, 12)}") for u in rng.integers(0, 60, 150)})
    log = _impressions([(u, c, T(1), T(1.1)) for u, c in edges])
    model = fit_graph(log, jaccard_k=3, community_folds=1)
    from engagesim.features.graph_fit import fit_graph_from_pairs

    pairs = history.window_aggregates(log.select("user_id", "creator_id", "window", "t_us", "follows_creator",
                                                 *[f"y_{e}" for e in ENGAGEMENTS]))["pair"]
    two = fit_graph_from_pairs(pairs, jaccard_k=3, community_folds=2)
    assert two.communities["like"].shape == (2, len(two.users) + len(two.creators))
    degree_u = {u: sum(1 for a, _ in edges if a == u) for u, _ in edges}
    first_user = {}
    for u, c in edges:
        first_user.setdefault(c, u)
    checked = moved = 0
    cols = [f"{p}_like" for p in ("same_community", "inv_community_size")]
    for u, c in edges:  # pairs whose removal keeps every key (and every id) of the graph
        if degree_u[u] < 2 or first_user[c] == u or sum(1 for _, b in edges if b == c) < 2:
            continue
        rest = pairs.filter((pl.col("user_id") != u) | (pl.col("creator_id") != c))
        assert _pair_columns(two, u, c, cols) == _pair_columns(
            fit_graph_from_pairs(rest, jaccard_k=3, community_folds=2), u, c, cols), (u, c)
        moved += _pair_columns(model, u, c, cols) != _pair_columns(
            fit_graph_from_pairs(rest, jaccard_k=3, community_folds=1), u, c, cols)
        checked += 1
        if checked == 8:
            break
    assert checked == 8 and moved >= 4  # one labelling: most pairs' own edges moved their own features
    everyone = (pl.Series([u for u, _ in edges]), pl.Series([c for _, c in edges]))
    two.save(str(tmp_path / "two"))
    assert GraphModel.load(str(tmp_path / "two")).features(*everyone).equals(two.features(*everyone))
    model.save(str(tmp_path / "one"))
    assert GraphModel.load(str(tmp_path / "one")).features(*everyone).equals(model.features(*everyone))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-10**13, 10**13), *[st.none() | st.integers(0, 10**13)] * len(ENGAGEMENTS)),
                min_size=1, max_size=70),
       st.integers(-10**12, 10**12), st.sampled_from([1, 6, 24]))
def test_few_impression_rows_prepared_in_arrow_equal_the_polars_path(rows, origin_us, hours):
    """A served request's impressions get their labels, µs time and window in Arrow (``few_labels_and_windows``):
    the same frame as polars' ``with_labels_and_windows`` — times before the origin (negative windows), nulls."""
    import pyarrow as pa

    from engagesim.features.impression import prepare
    from engagesim.features.text import FEW_ROWS
    from engagesim.schema import INTERACTIONS

    stamp = INTERACTIONS.field("impression_at").type
    columns = list(zip(*rows))
    table = pa.table({"user_id": [f"u{i}" for i in range(len(rows))], "post_id": ["p"] * len(rows),
                      "impression_at": pa.array(columns[0], pa.int64()).cast(stamp),
                      **{f"{e}_at": pa.array(columns[1 + k], pa.int64()).cast(stamp) for k, e in enumerate(ENGAGEMENTS)},
                      "follows_creator": [True] * len(rows)})
    assert (history.few_labels_and_windows(table, origin_us, hours) is not None) == (len(rows) <= FEW_ROWS)
    got = prepare(table, origin_us, hours)
    want = history.with_labels_and_windows(pl.from_arrow(table), origin_us, hours)
    if len(rows) <= FEW_ROWS:  # the few rows' frame leaves the engagement times out (their labels stay)
        want = want.drop([f"{e}_at" for e in ENGAGEMENTS])
    assert got.equals(want) and got.schema == want.schema
