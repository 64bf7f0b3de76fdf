"""The HTTP contract of the prediction service: request/response models and their conversion to rows.

Pydantic validates every field (types, ranges, sizes) so a bad request is a
422 naming the field, never a 500 further down. Requests become contract rows
(posts, interactions) and go through ``LoadedRun`` like any batch.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engagesim.schema import ENGAGEMENTS, INTERACTIONS, POSTS, request_post_id

EARLIEST = dt.datetime(2006, 3, 21, tzinfo=dt.timezone.utc)  # the first tweet
MAX_IMAGE_BYTES = 4 * 1024 * 1024
LATEST_S = 366 * 86400  # request times up to a year ahead


def _utc(value: dt.datetime) -> dt.datetime:
    value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if not EARLIEST <= value or value.timestamp() > time.time() + LATEST_S:  # (no datetime.now per field)
        raise ValueError(f"must be between {EARLIEST.date()} and one year from now")
    return value if value.tzinfo is dt.timezone.utc else value.astimezone(dt.timezone.utc)


class Media(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["photo", "video", "gif"]
    uri: str = Field(..., min_length=1, max_length=2048)


class PostIn(BaseModel):
    """A post to simulate. Only ``account``, ``text`` and ``created_at`` are required."""

    model_config = ConfigDict(extra="forbid")
    post_id: str | None = Field(None, min_length=1, max_length=128,
                                description="Known posts use the run's stored features; new posts get an id.")
    account: str = Field(..., min_length=1, max_length=128, description="The author's account id.")
    username: str | None = Field(None, max_length=128)
    company: str | None = Field(None, max_length=200)
    text: str = Field(..., max_length=20_000, description="Post text (the run's ingest.max_text_chars also applies).")
    created_at: dt.datetime = Field(..., description="When it goes out (ISO 8601; naive means UTC).")
    language: str | None = Field(None, max_length=16)
    media: list[Media] = Field(default_factory=list, max_length=10)
    image_base64: str | None = Field(None, max_length=MAX_IMAGE_BYTES * 4 // 3 + 8,
                                     description="An image to attach (base64), e.g. uploaded from the page.")
    follower_count: int | None = Field(None, ge=0, le=10_000_000_000,
                                       description="The account's followers; used when the run never saw it.")

    _check_time = field_validator("created_at")(classmethod(lambda cls, v: _utc(v)))


class ViewerIn(BaseModel):
    """The user the post is shown to (impression level)."""

    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(..., min_length=1, max_length=128)
    follows_creator: bool = False
    impression_at: dt.datetime | None = Field(None, description="Default: the post's created_at.")

    _check_time = field_validator("impression_at")(classmethod(lambda cls, v: None if v is None else _utc(v)))


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    post: PostIn
    viewer: ViewerIn | None = None
    explain: bool = Field(False, description="Add the XGBoost features that contributed most.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[PredictRequest] = Field(..., min_length=1)


class Likes(BaseModel):
    expected: float
    low: float = Field(..., description="10th percentile (validation residuals of the ensemble).")
    high: float = Field(..., description="90th percentile.")
    log1p: float


class Prediction(BaseModel):
    post_id: str
    likes: Likes
    engagement: dict[str, float] | None = Field(None, description="P(like/reply/retweet/quote) for the viewer.")
    members: dict[str, float] = Field(default_factory=dict, description=(
        "log1p(likes) of each model the served ensemble reads (the run's other members are not computed per "
        "request; `engagesim score --members all` gives them all)."))
    top_features: list[dict] | None = None
    model_version: str


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    model_version: str


def post_id_for(post: PostIn) -> str:
    return post.post_id or request_post_id(post.account, post.created_at, post.text)


def save_upload(data_b64: str, directory: str) -> str:
    """An uploaded image → a file named by its content hash (the featuriser reads media by URI)."""
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("post.image_base64 is not valid base64") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"post.image_base64 decodes to more than {MAX_IMAGE_BYTES} bytes")
    path = Path(directory) / f"{hashlib.sha256(data).hexdigest()}.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return str(path)


@dataclass
class RequestRows:
    """Requests as contract tables (``schema.POSTS`` / ``INTERACTIONS`` types, so ``runs._conform`` casts
    nothing), built column by column: a list of row dicts through ``Table.from_pylist`` then a cast per
    untyped column cost ~0.5 ms of a served post."""

    posts: pa.Table
    post_ids: list[str]
    impressions: pa.Table | None  # the requests with a viewer, in order
    with_viewer: list[int]  # their positions among the requests
    accounts: list[dict]  # attributes of accounts the request describes (follower_count)


def to_tables(requests: list[PredictRequest], upload_dir: str) -> RequestRows:
    """Requests → contract tables of their posts and (those with a viewer) impressions."""
    post_ids, authors, usernames, companies, texts, media, created, languages = ([] for _ in range(8))
    accounts, with_viewer = [], []
    for i, req in enumerate(requests):
        p = req.post
        items = [m.model_dump() for m in p.media]
        if p.image_base64:
            items.insert(0, {"kind": "photo", "uri": save_upload(p.image_base64, upload_dir)})
        post_ids.append(post_id_for(p))
        authors.append(p.account)
        usernames.append(p.username or p.account)
        companies.append(p.company)
        texts.append(p.text)
        media.append(items)
        created.append(p.created_at)
        languages.append(p.language)
        if p.follower_count is not None:
            accounts.append({"author_id": p.account, "follower_count": float(p.follower_count)})
        if req.viewer is not None:
            with_viewer.append(i)
    n = len(requests)
    posts = pa.table([post_ids, authors, usernames, companies, texts, media, created, languages,
                      *([None] * n for _ in range(4))], schema=POSTS)
    impressions = None
    if with_viewer:
        viewers = [requests[i].viewer for i in with_viewer]
        impressions = pa.table([[v.user_id for v in viewers], [post_ids[i] for i in with_viewer],
                                [authors[i] for i in with_viewer],
                                [v.impression_at or created[i] for v, i in zip(viewers, with_viewer)],
                                *([None] * len(viewers) for _ in ENGAGEMENTS),
                                [v.follows_creator for v in viewers]], schema=INTERACTIONS)
    return RequestRows(posts, post_ids, impressions, with_viewer, accounts)


class GenerateRequest(BaseModel):
    """Best-of-N content simulation: candidate posts for an account and time, ranked by predicted likes."""

    model_config = ConfigDict(extra="forbid")
    account: str = Field(..., min_length=1, max_length=128, description="The account that will post.")
    created_at: dt.datetime = Field(..., description="When it goes out (ISO 8601; naive means UTC).")
    company: str | None = Field(None, max_length=200)
    image_base64: str | None = Field(None, max_length=MAX_IMAGE_BYTES * 4 // 3 + 8,
                                     description="An image to post with; it is captioned for the prompt.")
    n: int = Field(8, ge=1, le=32, description="Candidates to generate and rank.")
    target_likes: int | None = Field(None, ge=0, le=10_000_000_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    _check_time = field_validator("created_at")(classmethod(lambda cls, v: _utc(v)))


class Candidate(BaseModel):
    rank: int
    text: str
    hashtags: list[str]
    expected_likes: float
    likes_low: float
    likes_high: float
    log1p_likes: float


class GenerateResponse(BaseModel):
    account: str
    created_at: str
    company: str | None
    prompt: str
    caption: str | None
    target_likes: int | None
    candidates: list[Candidate]
