"""The latent state of a synthetic world and the engagement model that reads it.

Everything here is vectorised numpy and deterministic given the seed. The
driver builds a ``World`` once (users, authors, post latents); Ray tasks then
turn slices of it into rows. Every random draw that belongs to one shard uses
a generator seeded by (world seed, stream, shard index), which is why the
output does not depend on how many workers ran the shards.

The generative process is documented in ``engagesim/synth/README.md``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, ndtri
from scipy.stats import norm

from engagesim.config import SynthConfig
from engagesim.metrics import quantile_edges
from engagesim.schema import ENGAGEMENTS, IMAGE_PROPERTIES
from engagesim.synth import vocab

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR

# Random streams: one per kind of draw, so adding a draw to one never shifts another.
STREAM_USERS, STREAM_POSTS, STREAM_POST_TEXT, STREAM_IMAGES, STREAM_IMPRESSIONS, STREAM_CALIBRATION = range(6)

TARGET_RATES = {"like": 0.40, "reply": 0.03, "retweet": 0.10, "quote": 0.01}  # RecSys 2021 training set
MEDIA_KINDS = np.array(["photo", "video", "gif"])

# Per-engagement weights of the impression model, columns = like, reply, retweet, quote.
W = {
    "interest": np.array([1.0, 0.6, 0.8, 0.5]),
    "popularity": np.array([0.35, -0.25, 0.45, 0.2]),
    "user_bias": np.array([1.0, 0.8, 0.8, 0.7]),
    "pair": np.array([1.0, 1.2, 0.8, 0.8]),
    "follows": np.array([0.6, 0.5, 0.4, 0.3]),
    "quality": np.array([0.8, 0.4, 0.8, 0.6]),
    "question": np.array([0.0, 0.9, -0.1, 0.3]),
    "url": np.array([-0.2, -0.1, 0.5, 0.2]),
    "video": np.array([0.2, 0.0, 0.3, 0.1]),
    "image": np.array([0.6, 0.1, 0.4, 0.2]),
    "positive": np.array([0.2, 0.0, 0.1, 0.0]),
    "negative": np.array([-0.2, 0.4, 0.1, 0.4]),
    "hour": np.array([0.25, 0.1, 0.15, 0.1]),
}


def rng_for(seed: int, stream: int, shard: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, shard])


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A stateless 64-bit hash: the same (user, creator) pair always gets the same latent values."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_uniform(seed: int, users: np.ndarray, creators: np.ndarray, salt: int) -> np.ndarray:
    """Uniform(0,1) per (user, creator) pair, stable across shards and runs."""
    with np.errstate(over="ignore"):
        key = (users.astype(np.uint64) * np.uint64(0x100000001B3)) ^ (creators.astype(np.uint64) + np.uint64(salt))
        key = key ^ np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)
    h = splitmix64(key)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def expected_positive_part(mu: np.ndarray, sigma: float) -> np.ndarray:
    """E[max(0, X)] for X ~ N(mu, sigma²): the true expected log1p(likes) before rounding."""
    z = mu / sigma
    return mu * norm.cdf(z) + sigma * norm.pdf(z)


@dataclass
class World:
    cfg: SynthConfig
    start_us: int
    # users
    interest: np.ndarray  # (U, T) Dirichlet interest over topics
    community: np.ndarray  # (U,) main interest
    followers: np.ndarray
    following: np.ndarray
    verified: np.ndarray
    created_us: np.ndarray
    language: np.ndarray  # (U,) index into vocab.LANGUAGE_NAMES
    user_bias: np.ndarray  # (U,) engagement propensity
    # authors (a subset of users)
    authors: np.ndarray  # (A,) user index
    author_company: list[str | None]
    author_effect: np.ndarray  # (A,) account effect on post-level likes
    usernames: list[str]  # (U,)
    # posts
    post_author: np.ndarray  # (P,) index into authors
    post_topic: np.ndarray
    post_created_us: np.ndarray
    post_language: np.ndarray
    post_quality: np.ndarray
    n_media: np.ndarray
    media_kind: np.ndarray  # (P, 4) kind index, -1 = none
    has_question: np.ndarray
    has_url: np.ndarray
    n_hashtags: np.ndarray
    sentiment: np.ndarray  # -1, 0, 1
    image_props: np.ndarray  # (P, 5) in [0, 1]
    image_effect: np.ndarray  # (P,) 0 for posts without a photo
    drawn: np.ndarray  # (P,) bool: a real PNG is generated for this post
    mu: np.ndarray  # (P,) mean of log1p(likes) before noise
    sigma_likes: float
    post_cdf: np.ndarray  # impression sampling CDF over posts
    community_order: np.ndarray  # users sorted by community
    community_start: np.ndarray  # (T+1,) offsets into community_order
    intercepts: np.ndarray = field(default_factory=lambda: np.zeros(4))
    popularity_edges: np.ndarray = field(default_factory=lambda: np.zeros(4))  # 5 author-popularity groups

    @property
    def n_users(self) -> int:
        return len(self.followers)

    @property
    def n_posts(self) -> int:
        return len(self.post_author)

    @property
    def end_us(self) -> int:
        return self.start_us + self.cfg.days * US_PER_DAY

    def author_user(self, post_idx: np.ndarray) -> np.ndarray:
        return self.authors[self.post_author[post_idx]]

    # --- the impression-level engagement model --------------------------------------------------
    def logits(self, users: np.ndarray, posts: np.ndarray, hour: np.ndarray, follows: np.ndarray) -> np.ndarray:
        """(n, 4) logits of like, reply, retweet, quote for impressions of ``posts`` shown to ``users``."""
        creators = self.author_user(posts)
        topic = self.post_topic[posts]
        t = self.interest.shape[1]
        interest = self.interest[users, topic] * t - 1.0
        pop = (np.log1p(self.followers[creators]) - 6.0) / 2.0
        pair = ndtri(pair_uniform(self.cfg.seed, users, creators, salt=1)) * 0.6
        kinds = self.media_kind[posts]
        video = (kinds == 1).any(axis=1)
        hour_term = np.cos(2 * np.pi * (hour - 20) / 24)
        terms = (
            np.outer(interest, W["interest"])
            + np.outer(pop, W["popularity"])
            + np.outer(self.user_bias[users], W["user_bias"])
            + np.outer(pair, W["pair"])
            + np.outer(follows, W["follows"])
            + np.outer(self.post_quality[posts], W["quality"])
            + np.outer(self.has_question[posts], W["question"])
            + np.outer(self.has_url[posts], W["url"])
            + np.outer(video, W["video"])
            + np.outer(self.image_effect[posts], W["image"])
            + np.outer(self.sentiment[posts] > 0, W["positive"])
            + np.outer(self.sentiment[posts] < 0, W["negative"])
            + np.outer(hour_term, W["hour"])
        )
        return terms + self.intercepts

    def follows(self, users: np.ndarray, creators: np.ndarray) -> np.ndarray:
        """Whether a user follows a creator: a fixed property of the pair (the follow graph)."""
        same = self.community[users] == self.community[creators]
        pop = (np.log1p(self.followers[creators]) - 6.0) / 2.0
        p = expit(-2.4 + 2.0 * same + 0.4 * pop)
        return pair_uniform(self.cfg.seed, users, creators, salt=2) < p

    def sample_impressions(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Draw n impressions: which post, which viewer, when — and the true engagement probabilities."""
        posts = np.searchsorted(self.post_cdf, rng.random(n), side="right").clip(0, self.n_posts - 1)
        topic = self.post_topic[posts]
        users = rng.integers(0, self.n_users, n)
        in_community = rng.random(n) < 0.65
        start, end = self.community_start[topic], self.community_start[topic + 1]
        size = end - start
        pick = in_community & (size > 0)
        offset = (rng.random(n) * np.maximum(size, 1)).astype(np.int64)
        users[pick] = self.community_order[start[pick] + offset[pick]]
        delay = rng.exponential(8 * US_PER_HOUR, n).astype(np.int64)
        # Wrap (not clip) delays that run past the period, so impression times stay distinct.
        remaining = np.maximum(self.end_us - self.post_created_us[posts], 1)
        impression = self.post_created_us[posts] + delay % remaining
        creators = self.author_user(posts)
        follows = self.follows(users, creators)
        hour = (impression // US_PER_HOUR) % 24
        logits = self.logits(users, posts, hour, follows)
        return {"users": users, "posts": posts, "creators": creators, "impression_us": impression,
                "follows": follows, "logits": logits, "probs": expit(logits)}


def _daily_hour_weights() -> np.ndarray:
    hours = np.arange(24)
    w = 0.4 + np.exp(-0.5 * ((hours - 15) / 4.0) ** 2)  # posting peaks mid-afternoon UTC
    return w / w.sum()


DAY_WEIGHTS = np.array([1.1, 1.15, 1.15, 1.1, 1.0, 0.7, 0.65])  # Mon..Sun: fewer posts at weekends
WEEKDAY_LIKES = np.array([0.10, 0.15, 0.15, 0.10, 0.0, -0.25, -0.3])  # and fewer likes for them


def _post_times(rng: np.random.Generator, n: int, start_us: int, days: int) -> np.ndarray:
    start_weekday = dt.datetime.fromtimestamp(start_us / US_PER_SECOND, dt.timezone.utc).weekday()
    day_w = DAY_WEIGHTS[(start_weekday + np.arange(days)) % 7]
    day = rng.choice(days, size=n, p=day_w / day_w.sum())
    hour = rng.choice(24, size=n, p=_daily_hour_weights())
    within = rng.integers(0, US_PER_HOUR, n)
    return start_us + day * US_PER_DAY + hour * US_PER_HOUR + within


def _image_effect(props: np.ndarray) -> np.ndarray:
    brightness, contrast, hues, entropy, off_centre = props.T
    return (
        0.8 * (contrast - 0.5)
        + 0.5 * (hues - 0.5)
        - 1.2 * np.abs(brightness - 0.6)
        + 0.4 * (entropy - 0.5)
        + 0.6 * (off_centre - 0.3)
    )


def _usernames(rng: np.random.Generator, n_users: int, authors: np.ndarray, brand: np.ndarray) -> tuple[list[str], list]:
    names = [f"user{i:07d}" for i in range(n_users)]
    companies: list[str | None] = []
    for k, (user, is_brand) in enumerate(zip(authors, brand)):
        if is_brand:
            stem = vocab.BRAND_STEMS[k % len(vocab.BRAND_STEMS)]
            suffix = vocab.BRAND_SUFFIXES[(k // len(vocab.BRAND_STEMS)) % len(vocab.BRAND_SUFFIXES)]
            round_ = k // (len(vocab.BRAND_STEMS) * len(vocab.BRAND_SUFFIXES))
            names[user] = f"{stem}{suffix}" + (str(round_) if round_ else "")
            companies.append(f"{stem.lower()} {suffix.lower()}")
        else:
            names[user] = f"creator{user:07d}"
            companies.append(None)
    return names, companies


def build_world(cfg: SynthConfig) -> World:
    """Draw users, authors and post latents; calibrate intercepts to the target engagement rates."""
    start_us = int(dt.datetime.fromisoformat(cfg.start).timestamp() * US_PER_SECOND)
    rng = rng_for(cfg.seed, STREAM_USERS)
    n_topics, n_lang = len(vocab.TOPIC_NAMES), len(vocab.LANGUAGE_NAMES)
    U, P = cfg.users, cfg.posts

    interest = rng.dirichlet(np.full(n_topics, 0.3), size=U)
    community = interest.argmax(axis=1)
    lang_p = np.array([vocab.LANGUAGES[name][0] for name in vocab.LANGUAGE_NAMES])
    language = rng.choice(n_lang, size=U, p=lang_p / lang_p.sum())
    followers = np.floor(np.exp(rng.normal(4.5, 1.6, U))).astype(np.int64)
    following = np.floor(np.exp(rng.normal(5.0, 1.0, U))).astype(np.int64)
    user_bias = rng.normal(0, 0.7, U)

    n_authors = max(5, min(U, U // 8))
    authors = rng.choice(U, size=n_authors, replace=False)
    # Authors are the visible accounts: heavier-tailed audiences, a third of them brands.
    followers[authors] = np.floor(np.exp(rng.normal(8.0, 2.0, n_authors))).astype(np.int64)
    brand = rng.random(n_authors) < 0.35
    verified = rng.random(U) < expit(np.log1p(followers) - 11.0)
    created_us = start_us - rng.integers(30, 12 * 365, U) * US_PER_DAY - rng.integers(0, US_PER_DAY, U)
    author_effect = 0.7 * (np.log1p(followers[authors]) - 8.0) + rng.normal(0, 1.95, n_authors)
    usernames, companies = _usernames(rng, U, authors, brand)

    rng = rng_for(cfg.seed, STREAM_POSTS)
    activity = np.exp(rng.normal(0, 1.0, n_authors))  # some accounts post far more than others
    post_author = rng.choice(n_authors, size=P, p=activity / activity.sum())
    author_users = authors[post_author]
    own_topic = rng.random(P) < 0.75
    post_topic = np.where(own_topic, community[author_users],
                          (interest[author_users].cumsum(1) > rng.random((P, 1))).argmax(1))
    post_created = _post_times(rng, P, start_us, cfg.days)
    post_language = np.where(rng.random(P) < 0.9, language[author_users], rng.choice(n_lang, size=P))
    quality = rng.normal(0, 0.6, P)

    n_media = rng.choice(5, size=P, p=[0.42, 0.42, 0.08, 0.05, 0.03])
    kinds = rng.choice(3, size=(P, 4), p=[0.7, 0.22, 0.08])
    media_kind = np.where(np.arange(4)[None, :] < n_media[:, None], kinds, -1)
    has_photo = (media_kind == 0).any(axis=1)
    has_question = rng.random(P) < 0.15
    has_url = rng.random(P) < 0.35
    n_hashtags = rng.choice(4, size=P, p=[0.45, 0.3, 0.17, 0.08])
    sentiment = rng.choice([-1, 0, 1], size=P, p=[0.15, 0.55, 0.3])
    image_props = rng.random((P, len(IMAGE_PROPERTIES)))
    image_effect = np.where(has_photo, _image_effect(image_props), 0.0)
    photo_posts = np.flatnonzero(has_photo)
    drawn = np.zeros(P, dtype=bool)
    drawn[photo_posts[: cfg.images]] = True

    weekday = ((post_created // US_PER_DAY) + 3) % 7  # 1970-01-01 was a Thursday (weekday 3)
    hour = (post_created // US_PER_HOUR) % 24
    topic_effect = rng_for(cfg.seed, STREAM_POSTS, 1).normal(0, 0.3, n_topics)
    mu = (
        4.0
        + author_effect[post_author]
        + topic_effect[post_topic]
        + WEEKDAY_LIKES[weekday]
        + 0.25 * np.cos(2 * np.pi * (hour - 16) / 24)
        + np.where(n_media == 0, -0.3, 0.0)
        + 0.3 * (media_kind == 1).any(axis=1)
        + 0.8 * image_effect
        + 0.1 * has_question
        - 0.15 * has_url
        + 0.05 * n_hashtags
        + 0.15 * (sentiment > 0)
        - 0.1 * (sentiment < 0)
        + 0.3 * quality  # the part of a post's appeal no feature can see
    )
    post_weight = np.exp(0.5 * (mu - mu.max()))
    post_cdf = np.cumsum(post_weight) / post_weight.sum()
    order = np.argsort(community, kind="stable")
    community_start = np.searchsorted(community[order], np.arange(n_topics + 1))

    world = World(
        cfg=cfg, start_us=start_us, interest=interest, community=community, followers=followers,
        following=following, verified=verified, created_us=created_us, language=language, user_bias=user_bias,
        authors=authors, author_company=companies, author_effect=author_effect, usernames=usernames,
        post_author=post_author, post_topic=post_topic, post_created_us=post_created, post_language=post_language,
        post_quality=quality, n_media=n_media, media_kind=media_kind, has_question=has_question, has_url=has_url,
        n_hashtags=n_hashtags, sentiment=sentiment, image_props=image_props, image_effect=image_effect, drawn=drawn,
        mu=mu, sigma_likes=0.7, post_cdf=post_cdf, community_order=order, community_start=community_start,
    )
    world.intercepts = calibrate_intercepts(world)
    return world


def calibrate_intercepts(world: World, pilot: int = 100_000) -> np.ndarray:
    """Per-engagement intercepts that hit the RecSys 2021 rates on a fixed pilot sample (bisection)."""
    world.intercepts = np.zeros(4)
    sample = world.sample_impressions(rng_for(world.cfg.seed, STREAM_CALIBRATION), pilot)
    world.popularity_edges = quantile_edges(world.followers[sample["creators"]], 5)
    base = sample["logits"]  # logits without intercept
    out = np.zeros(4)
    for k, name in enumerate(ENGAGEMENTS):
        lo, hi = -15.0, 15.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if expit(base[:, k] + mid).mean() > TARGET_RATES[name]:
                hi = mid
            else:
                lo = mid
        out[k] = (lo + hi) / 2
    return out
