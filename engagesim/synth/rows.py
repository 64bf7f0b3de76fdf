"""Turn slices of a ``World`` into contract tables (and the ground-truth tables beside them).

Pure functions of (world, shard, rng): no Ray, no I/O, so they are unit-tested
directly and the Ray layer only decides which shard runs where.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engagesim.schema import (
    ENGAGEMENTS,
    INTERACTIONS,
    MEDIA_ITEM,
    POSTS,
    TIMESTAMP,
    TRUTH_INTERACTIONS,
    TRUTH_POSTS,
    USERS,
)
from engagesim.synth import vocab
from engagesim.synth.world import IMAGE_PROPERTIES, MEDIA_KINDS, US_PER_SECOND, World


def ids(prefix: str, index: np.ndarray, width: int) -> pa.Array:
    """Vectorised "u0000042"-style ids (no Python string per row)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.asarray(index, dtype=np.int64)), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def user_ids(index: np.ndarray) -> pa.Array:
    return ids("u", index, 8)


def post_ids(index: np.ndarray) -> pa.Array:
    return ids("p", index, 9)


def _timestamps(us: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    arr = pa.array(np.asarray(us, dtype=np.int64), mask=None if valid is None else ~valid)
    return arr.cast(TIMESTAMP)


def users_table(world: World, lo: int, hi: int) -> pa.Table:
    idx = np.arange(lo, hi)
    languages = np.array(vocab.LANGUAGE_NAMES)[world.language[idx]]
    return pa.table(
        {
            "user_id": user_ids(idx),
            "follower_count": world.followers[idx],
            "following_count": world.following[idx],
            "verified": world.verified[idx],
            "created_at": _timestamps(world.created_us[idx]),
            "language": languages,
        },
        schema=USERS,
    )


def compose_text(world: World, post: int, rng: np.random.Generator) -> str:
    """A post's text from its topic vocabulary, language, sentiment, hashtags, mentions and link."""
    topic = vocab.TOPICS[vocab.TOPIC_NAMES[world.post_topic[post]]]
    function_words = vocab.LANGUAGES[vocab.LANGUAGE_NAMES[world.post_language[post]]][1]
    n_words = 4 + rng.poisson(7)
    words = [
        str(rng.choice(topic["words"])) if rng.random() < 0.7 else str(rng.choice(function_words))
        for _ in range(n_words)
    ]
    if world.sentiment[post] != 0:
        pool = vocab.POSITIVE if world.sentiment[post] > 0 else vocab.NEGATIVE
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(pool)))
    if rng.random() < 0.1:
        k = int(rng.integers(0, len(words)))
        words[k] = words[k].upper()
    words[0] = words[0][:1].upper() + words[0][1:]
    text = " ".join(words) + ("!" if world.sentiment[post] > 0 and rng.random() < 0.5 else ".")
    if rng.random() < 0.2:
        other = world.authors[rng.integers(0, len(world.authors))]
        text = f"@{world.usernames[other]} {text}"
    if world.has_question[post]:
        text += " " + str(rng.choice(vocab.QUESTIONS))
    if rng.random() < 0.15:
        text += " " + str(rng.choice(vocab.CALLS_TO_ACTION))
    if world.has_url[post]:
        text += f" https://{rng.choice(topic['domains'])}/{rng.choice(topic['words'])}-{int(rng.integers(100, 999))}"
    tags = rng.choice(topic["hashtags"], size=world.n_hashtags[post], replace=False)
    if len(tags):
        text += " " + " ".join(f"#{t}" for t in tags)
    return text


def media_items(world: World, post: int, post_id: str, media_root: str) -> list[dict[str, str]]:
    """Media of a post: real PNG URIs for drawn images, unreachable (.invalid) URIs for the rest."""
    items = []
    for k, kind in enumerate(world.media_kind[post]):
        if kind < 0:
            break
        name = MEDIA_KINDS[kind]
        if k == 0 and world.drawn[post]:
            uri = f"{media_root.rstrip('/')}/{post_id}.png"
        else:
            ext = {"photo": "jpg", "video": "mp4", "gif": "gif"}[name]
            uri = f"https://media.engagesim.invalid/{post_id}/{k}.{ext}"
        items.append({"kind": str(name), "uri": uri})
    return items


def post_counts(world: World, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    log_likes = np.maximum(0.0, world.mu[idx] + rng.normal(0, world.sigma_likes, len(idx)))
    likes = np.round(np.expm1(log_likes)).astype(np.int64)
    question = world.has_question[idx]
    return {
        "likes": likes,
        "retweets": np.round(likes * rng.beta(2, 12, len(idx))).astype(np.int64),
        "replies": np.round(likes * rng.beta(1, 30, len(idx)) * (1 + 2 * question)).astype(np.int64),
        "quotes": np.round(likes * rng.beta(1, 60, len(idx))).astype(np.int64),
    }


def posts_tables(world: World, lo: int, hi: int, rng: np.random.Generator, media_root: str) -> tuple[pa.Table, pa.Table]:
    """Posts rows [lo, hi) and their ground truth."""
    from engagesim.synth.world import expected_positive_part

    idx = np.arange(lo, hi)
    pids = post_ids(idx)
    author_users = world.authors[world.post_author[idx]]
    texts = [compose_text(world, int(p), rng) for p in idx]
    pid_list = pids.to_pylist()
    media = [media_items(world, int(p), pid, media_root) for p, pid in zip(idx, pid_list)]
    counts = post_counts(world, idx, rng)
    posts = pa.table(
        {
            "post_id": pids,
            "author_id": user_ids(author_users),
            "username": [world.usernames[u] for u in author_users],
            "company": [world.author_company[a] for a in world.post_author[idx]],
            "text": texts,
            "media": pa.array(media, type=pa.list_(MEDIA_ITEM)),
            "created_at": _timestamps(world.post_created_us[idx]),
            "language": np.array(vocab.LANGUAGE_NAMES)[world.post_language[idx]],
            **counts,
        },
        schema=POSTS,
    )
    truth = pa.table(
        {
            "post_id": pids,
            "expected_log1p_likes": expected_positive_part(world.mu[idx], world.sigma_likes),
            "topic": np.array(vocab.TOPIC_NAMES)[world.post_topic[idx]],
            "account_effect": world.author_effect[world.post_author[idx]],
            "quality": world.post_quality[idx],
            "image_effect": world.image_effect[idx],
            **{f"image_{p}": world.image_props[idx, k] for k, p in enumerate(IMAGE_PROPERTIES)},
        },
        schema=TRUTH_POSTS,
    )
    return posts, truth


def interactions_tables(world: World, n: int, rng: np.random.Generator) -> tuple[pa.Table, pa.Table, dict]:
    """n impressions with sampled labels, their true probabilities, and the sums for exact oracle RCE."""
    s = world.sample_impressions(rng, n)
    probs = s["probs"]
    labels = rng.random(probs.shape) < probs
    delays = rng.exponential(15 * 60 * US_PER_SECOND, probs.shape).astype(np.int64)
    uid, pid = user_ids(s["users"]), post_ids(s["posts"])
    impression = _timestamps(s["impression_us"])
    columns = {
        "user_id": uid,
        "post_id": pid,
        "creator_id": user_ids(s["creators"]),
        "impression_at": impression,
        **{f"{e}_at": _timestamps(s["impression_us"] + delays[:, k], labels[:, k]) for k, e in enumerate(ENGAGEMENTS)},
        "follows_creator": s["follows"],
    }
    groups = np.searchsorted(world.popularity_edges, world.followers[s["creators"]], side="right").astype(np.int8)
    truth = pa.table(
        {
            "user_id": uid,
            "post_id": pid,
            "impression_at": impression,
            **{f"p_{e}": probs[:, k] for k, e in enumerate(ENGAGEMENTS)},
            "popularity_group": groups,
        },
        schema=TRUTH_INTERACTIONS,
    )
    return pa.table(columns, schema=INTERACTIONS), truth, oracle_sums(labels, probs, groups)


def oracle_sums(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, n_groups: int = 5) -> dict:
    """Additive sums (per engagement, overall and per popularity group) from which RCE is exact."""
    from engagesim.metrics import EPS

    p = np.clip(probs, EPS, 1 - EPS)
    ce = -(labels * np.log(p) + (~labels) * np.log1p(-p))
    out = {"count": int(len(labels)), "ce": ce.sum(0).tolist(), "positives": labels.sum(0).astype(int).tolist(),
           "groups": {}}
    for g in range(n_groups):
        m = groups == g
        out["groups"][str(g)] = {"count": int(m.sum()), "ce": ce[m].sum(0).tolist(),
                                 "positives": labels[m].sum(0).astype(int).tolist()}
    return out
