"""RecSys 2021-format logs from a world engagesim's own generator does not make (issue 21, item 4).

The behaviour models were built and tuned on ``engagesim.synth``'s world; a score there says little about
logs from elsewhere. This generator draws Twitter-style impression logs from a different model, with knobs a
real log differs in, and keeps the true engagement probability of every impression, so a run trained on the
logs can be held against the best any model could do (the oracle) on its own test rows:

- users have **sparse topic interests** (Dirichlet with concentration ``interest_concentration``), not latent
  vectors; a tweet has one topic, carried by its words and (sometimes) a hashtag, never by an id;
- creators have a **quality** and a Zipf popularity (``popularity_skew``); the feed shows a user tweets of the
  topics they like (``feed_relevance``) from popular creators;
- ``cold_user_share`` of the users appear only in the last ``cold_days`` (no history at all);
- each engagement is a logistic function of topic affinity, creator quality, the user's own propensity, the
  follow flag and media, with its own weights (``WEIGHTS``).

``generate`` writes ``logs/part-00000.tsv.gz`` (24 ``\\x01``-separated fields, what ``data.source=recsys``
reads) and ``truth.parquet`` (user_id, post_id, impression_at, p_<engagement>, the latent ``FACTORS``, the
tweet's topic and what the line shows, for every line). Pure numpy; the same config and seed give the same bytes.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engagesim.schema import ENGAGEMENTS

START = 1_612_396_800  # 2021-02-04 00:00 UTC, the RecSys 2021 period
DAY = 86_400
# Per engagement: intercept, topic affinity, creator quality, user propensity, follows, photo.
# Intercepts put the rates near RecSys 2021's (like ~39 %, retweet ~9 %, reply ~3 %, quote ~1 %).
WEIGHTS = {"like": (-1.1, 0.9, 0.8, 0.9, 0.6, 0.3), "reply": (-4.6, 0.6, 0.3, 1.2, 0.9, -0.2),
           "retweet": (-3.6, 1.1, 1.1, 0.8, 0.4, 0.2), "quote": (-5.8, 0.8, 0.6, 1.0, 0.5, 0.0)}
WORDS = np.arange(2_000, 29_000)  # ordinary wordpiece ids of the bert-base-uncased vocabulary

# The latent factors truth.parquet keeps beside each impression's probabilities, so an evaluation can say which one
# a model misses: the viewer's affinity to the tweet's topic, the creator's quality, the viewer's own propensity.
FACTORS = ("affinity", "creator_quality", "user_propensity")


@dataclass(frozen=True)
class ForeignWorld:
    users: int = 20_000
    creators: int = 2_000
    tweets: int = 20_000
    impressions: int = 300_000
    days: int = 14
    topics: int = 24
    interest_concentration: float = 0.3
    popularity_skew: float = 1.1
    feed_relevance: float = 0.6
    cold_user_share: float = 0.1
    cold_days: int = 3
    seed: int = 0


def generate(world: ForeignWorld, out: str) -> dict:
    """Write the logs and the truth under ``out``; returns a summary (rows, engagement rates)."""
    rng = np.random.default_rng(world.seed)
    t, u, c = world.topics, world.users, world.creators
    interest = rng.dirichlet(np.full(t, world.interest_concentration), size=u)
    propensity = rng.normal(0, 0.7, size=u)
    activity = rng.lognormal(0, 1.0, size=u)
    cold = rng.random(u) < world.cold_user_share
    quality = rng.normal(0, 0.6, size=c)
    popularity = 1.0 / np.arange(1, c + 1) ** world.popularity_skew
    rng.shuffle(popularity)
    creator_topics = rng.integers(0, t, size=(c, 2))  # each creator writes on two topics
    topic_words = rng.choice(WORDS, size=(t, 40))

    # Tweets: a creator by popularity, one of its topics, a time, words, maybe a hashtag and a photo.
    author = rng.choice(c, size=world.tweets, p=popularity / popularity.sum())
    topic = creator_topics[author, rng.integers(0, 2, size=world.tweets)]
    tweet_at = START + rng.integers(0, world.days * DAY, size=world.tweets)
    photo = rng.random(world.tweets) < 0.3
    hashtag = rng.random(world.tweets) < 0.4

    # Impressions: a user by activity; a topic from their interests (or any topic); a tweet of that topic by its
    # creator's popularity. Cold users see only tweets of the last ``cold_days``.
    viewer = rng.choice(u, size=world.impressions, p=activity / activity.sum())
    relevant = rng.random(world.impressions) < world.feed_relevance
    cum = np.cumsum(interest[viewer], axis=1)
    liked_topic = (cum < rng.random(world.impressions)[:, None] * cum[:, -1:]).sum(axis=1)
    shown_topic = np.where(relevant, liked_topic, rng.integers(0, t, size=world.impressions))
    recent = tweet_at >= START + (world.days - world.cold_days) * DAY
    tweet = np.full(world.impressions, -1)
    for pool, rows in ((np.ones(world.tweets, bool), ~cold[viewer]), (recent, cold[viewer])):
        weight = popularity[author] * pool
        for k in range(t):
            candidates = np.flatnonzero(topic == k)
            w = weight[candidates]
            picked = rows & (shown_topic == k)
            if w.sum() == 0 or not picked.any():
                continue
            tweet[picked] = candidates[rng.choice(len(candidates), size=picked.sum(), p=w / w.sum())]
    keep = tweet >= 0
    viewer, tweet = viewer[keep], tweet[keep]
    # A user sees a tweet once (RecSys lines are unique per user and tweet): the first draw of a pair is kept.
    _, first = np.unique(viewer.astype(np.int64) * world.tweets + tweet, return_index=True)
    first.sort()
    viewer, tweet = viewer[first], tweet[first]
    n = len(tweet)
    creator = author[tweet]
    affinity = np.log(interest[viewer, topic[tweet]] * t + 0.05)
    follows = rng.random(n) < 1 / (1 + np.exp(-(-1.5 + 0.8 * affinity)))
    truth = {}
    for e in ENGAGEMENTS:
        a, b_topic, b_quality, b_user, b_follow, b_photo = WEIGHTS[e]
        z = (a + b_topic * affinity + b_quality * quality[creator] + b_user * propensity[viewer]
             + b_follow * follows + b_photo * photo[tweet])
        truth[e] = 1 / (1 + np.exp(-z))
    engaged = {e: rng.random(n) < truth[e] for e in ENGAGEMENTS}
    delay = rng.exponential(3_600, size=(n, 4)).astype(np.int64)

    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    ids_u = np.array([f"U{i:06X}" for i in range(u)])
    ids_c = np.array([f"C{i:05X}" for i in range(c)])
    ids_t = np.array([f"T{i:07X}" for i in range(world.tweets)])
    followers_u = rng.lognormal(4, 1.5, size=u).astype(np.int64)
    followers_c = (rng.lognormal(6, 1.5, size=c) * (1 + 50 * popularity / popularity.max())).astype(np.int64)
    texts = [_text(rng, topic_words[topic[i]]) for i in range(world.tweets)]
    created_u = START - rng.integers(30, 3_000, size=u) * DAY
    created_c = START - rng.integers(30, 3_000, size=c) * DAY
    order = np.lexsort((viewer, tweet_at[tweet]))
    with gzip.open(os.path.join(out, "logs", "part-00000.tsv.gz"), "wt", encoding="utf-8", compresslevel=1) as f:
        for i in order:
            v, w, cr = viewer[i], tweet[i], creator[i]
            ts = int(tweet_at[w])
            stamps = [str(ts + int(delay[i, j])) if engaged[e][i] else "" for j, e in
                      enumerate(("reply", "retweet", "quote", "like"))]
            f.write("\x01".join([
                texts[w], f"h{topic[w]:02d}" if hashtag[w] else "", ids_t[w], "Photo" if photo[w] else "", "", "",
                "TopLevel", f"L{topic[w] % 3}", str(ts), ids_c[cr], str(followers_c[cr]), "100",
                "false", str(created_c[cr]), ids_u[v], str(followers_u[v]), "50", "false", str(created_u[v]),
                "true" if follows[i] else "false", *stamps]) + "\n")
    # Creators are users of the log too (as in RecSys): their ids never meet a viewer's, so keys stay apart.
    table = pa.table({"user_id": ids_u[viewer[order]], "post_id": ids_t[tweet[order]],
                      "impression_at": pa.array(tweet_at[tweet[order]] * 1_000_000, pa.timestamp("us", "UTC")),
                      **{f"p_{e}": truth[e][order].astype(np.float64) for e in ENGAGEMENTS},
                      **{name: factor[order].astype(np.float64) for name, factor in
                         zip(FACTORS, (affinity, quality[creator], propensity[viewer]), strict=True)},
                      # What the line shows (engagements, follow flag, photo) and the tweet's true topic, for
                      # a bound that knows the topics but estimates affinity from the log (jobs/evaluation.py).
                      **{f"engaged_{e}": engaged[e][order] for e in ENGAGEMENTS},
                      "topic": topic[tweet[order]].astype(np.int32), "follows": follows[order],
                      "photo": photo[tweet[order]]})
    pq.write_table(table, os.path.join(out, "truth.parquet"))
    return {"world": asdict(world), "rows": n, "rates": {e: round(float(engaged[e].mean()), 4) for e in ENGAGEMENTS},
            "cold_rows": int(cold[viewer].sum())}


def _text(rng: np.random.Generator, words: np.ndarray) -> str:
    """[CLS] + 8–15 wordpieces, 70 % of them the topic's own + [SEP], as RecSys's tab-separated ids."""
    k = int(rng.integers(8, 16))
    own = rng.random(k) < 0.7
    ids = np.where(own, rng.choice(words, size=k), rng.choice(WORDS, size=k))
    return "\t".join(map(str, [101, *ids.tolist(), 102]))
