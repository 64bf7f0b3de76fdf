"""Fitted feature state: what the batch pipeline learned, saved so any row can be featurised later.

Training fits target-encoding statistics, the language vocabulary, PCA bases,
text clusters, history tables and the interaction graph. Scoring a new post
(``engagesim score``, Ray Serve, ``load_run().predict``) must apply *exactly*
those, through *exactly* the code that produced the validation features —
otherwise served predictions drift from evaluated ones (training/serving skew).
So the pipeline featurises its validation rows with the state it is about to
save, and the serving paths load that state and call the same function.

Each state is an ordered list of feature ops (``features/ops.py``; the post ops, and the impression ops of
``features/impression_ops.py``): fitting, transforming, saving, loading and the manifest's provenance are loops
over it, the same for both executors.

Saved in safe formats only: Parquet tables, safetensors arrays, JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from safetensors.numpy import load as load_arrays

from engagesim import io
from engagesim.features import ops as feature_ops
from engagesim.features import post_fit
from engagesim.features.embedding_ops import Projection, Projections, TextClusters, Vectors, nearest_centre  # noqa: F401
from engagesim.features.history import GROUPS
from engagesim.features.impression_ops import OPS_BY_NAME as IMPRESSION_OPS
from engagesim.features.impression_ops import Accounts, Graph, History, PostSide
from engagesim.features.ops import Apply, FeatureOp, Provenance, Rows, Snapshot  # noqa: F401 (re-exported)
from engagesim.features.post_fit import LIST_SUMMARY, TE_LIST, TE_SCALAR  # noqa: F401 (re-exported)
from engagesim.features.post_ops import (  # noqa: F401 (re-exported)
    AUTHOR_ATTRIBUTES,
    EMBEDDING_BLOCKS,
    AuthorAttributes,
    ImageStats,
    Languages,
    Reach,
    RowColumns,
    TargetEncoding,
    Temporal,
    TeSettings,
    block_matrix,
    fixed_list_matrix,
    table_or_parts,
    user_attributes,
)
from engagesim.features.reach import AuthorReach
from engagesim.io import safe_bytes

# The post ops in column order; a saved state names its own (``state.json``'s "ops"). States saved before the
# ops had names are loaded by offering every kind, each reading its presence from the saved meta.
POST_OPS: tuple[type[FeatureOp], ...] = (RowColumns, Temporal, TargetEncoding, Reach, AuthorAttributes, Languages,
                                         ImageStats, Projections, TextClusters, Vectors)
OPS_BY_NAME = {kind.name: kind for kind in POST_OPS}


@dataclass
class PostState:
    """Everything post-level features need beyond the row itself: an ordered list of fitted ops."""

    ops: list[FeatureOp]
    saved_parts: list[str] = field(default_factory=list)  # per-post tables already written as parts (Ray executor)

    @classmethod
    def build(cls, options: post_fit.PostOptions, users: pl.DataFrame | None, has_likes: bool, train_rows: int,
              reach_cutoff_us: int | None = None) -> PostState:
        """The unfitted ops of a post table (``reach_cutoff_us``: the interaction log's cutoff, when there is one)."""
        accounts = None if users is None else users.select(
            pl.col("user_id").alias("author_id"), pl.col("created_at").alias("_account_created"))
        ops: list[FeatureOp] = [RowColumns(), Temporal(accounts)]
        if has_likes:
            ops.append(TargetEncoding(TeSettings(options.smoothing, options.te_mode, options.te_folds)))
        if reach_cutoff_us is not None:
            ops.append(Reach(reach_cutoff_us, options.reach_exposure_hours))
        if users is not None:
            ops.append(AuthorAttributes.of(users))
        ops += [Languages(), ImageStats(), Projections(options.pca_components),
                TextClusters(options.text_clusters, train_rows), Vectors()]
        return cls(ops)

    @classmethod
    def fit(cls, df: pl.DataFrame, y: np.ndarray, train: np.ndarray, users: pl.DataFrame | None,
            options: post_fit.PostOptions, has_likes: bool, fold: np.ndarray | None = None,
            reach_cutoff_us: int | None = None) -> PostState:
        """The in-process executor: every op's partial fit on the whole frame as one block (with
        ``reach_cutoff_us``, ``df`` carries each post's impression count as ``impressions``)."""
        fold = np.zeros(df.height, np.int64) if fold is None else fold
        labelled = df["likes"].is_not_null().to_numpy() if "likes" in df.columns else np.zeros(df.height, bool)
        state = cls.build(options, users, has_likes, int(train.sum()), reach_cutoff_us)
        feature_ops.fit_in_process(state.ops, Rows(df, y, train, fold, labelled))
        return state

    def op(self, kind: type[FeatureOp]) -> Any:
        return feature_ops.first(self.ops, kind)

    # -- what callers read of the fitted state --------------------------------------------------
    @property
    def te(self) -> TargetEncoding | None:
        return self.op(TargetEncoding)

    @property
    def prior(self) -> float:
        return self.te.prior if self.te else 0.0

    @property
    def te_scalar(self) -> dict:
        return self.te.te_scalar if self.te else {}

    @property
    def te_list(self) -> dict:
        return self.te.te_list if self.te else {}

    @property
    def latest(self) -> dict:
        return self.te.latest if self.te else {}

    @property
    def tables(self) -> post_fit.TargetTables | None:
        return self.te.tables if self.te else None

    @property
    def hier_smoothing(self) -> float | None:
        return self.te.hier_smoothing if self.te else None

    @property
    def top_langs(self) -> list[str]:
        return self.op(Languages).top

    @property
    def projections(self) -> dict[str, Projection]:
        return self.op(Projections).projections

    @property
    def centres(self) -> np.ndarray | None:
        return self.op(TextClusters).centres

    @property
    def authors(self) -> pl.DataFrame | None:
        op = self.op(AuthorAttributes)
        return op.authors if op else None

    @property
    def known_posts(self) -> pl.DataFrame | None:
        return self.op(Temporal).known

    @property
    def reach(self) -> AuthorReach | None:
        op = self.op(Reach)
        return op.reach if op else None

    def provenance(self) -> dict[str, Provenance]:
        """Column → the method and leak class of the op that made it (the feature manifest's source)."""
        return feature_ops.provenance(self.ops)

    # -- apply ----------------------------------------------------------------------------------
    def transform(self, df: pl.DataFrame, new_accounts: pl.DataFrame | None = None,
                  roles: Rows | None = None) -> pl.DataFrame:
        """Streamed post rows (row-local features, embeddings, image statistics) → post feature table.

        Without ``roles`` every row gets the apply version (training statistics), as serving does; with them
        training rows get their leak-free target encodings. ``new_accounts`` (author_id + any attribute columns)
        describe accounts the run never saw (cold start); known accounts keep their snapshot.
        """
        return feature_ops.transform(self.ops, df, Apply(roles, new_accounts))

    def arrays(self, df: pl.DataFrame, new_accounts: pl.DataFrame | None = None) -> dict[str, np.ndarray]:
        """``transform``'s numeric columns as numpy (NaN: null), every row the apply version: what the models
        read of a served post, without its frame (each op's ``arrays``; ``tests/test_run_api.py`` holds the
        scores of both forms bit-identical)."""
        return feature_ops.arrays(self.ops, df, Apply(None, new_accounts))

    # -- persistence ----------------------------------------------------------------------------
    def save(self, uri: str, storage=None) -> None:
        meta: dict[str, Any] = {"ops": [op.name for op in self.ops]}
        arrays: dict[str, np.ndarray] = {}
        for op in self.ops:
            m, a = op.save(uri, storage, set(self.saved_parts))
            meta.update(m)
            arrays.update(a)
        io.write_bytes(io.join(uri, "arrays.safetensors"), safe_bytes(arrays) if arrays else b"", storage)
        io.write_json(io.join(uri, "state.json"), meta, storage)

    @classmethod
    def load(cls, uri: str, storage=None, snapshot: Snapshot = "latest") -> PostState:
        """``snapshot``: "latest" serves target encodings over every labelled row; "cutoff" those the
        validation and test rows were featurised with (what the served = evaluated checks compare)."""
        meta = io.read_json(io.join(uri, "state.json"), storage)
        raw = io.read_bytes(io.join(uri, "arrays.safetensors"), storage)
        arrays = load_arrays(raw) if raw else {}
        kinds = [OPS_BY_NAME[name] for name in meta["ops"]] if "ops" in meta else POST_OPS
        return cls([op for kind in kinds if (op := kind.load(uri, storage, meta, arrays, snapshot)) is not None])

    def index_for_lookups(self) -> None:
        """Serving (a loaded run): its fitted tables answer a few keys by index, not by a join per call."""
        for op in self.ops:
            op.index_for_lookups()


@dataclass
class ImpressionState:
    """The point-in-time snapshot impression rows are featurised with: an ordered list of impression ops
    (``features/impression_ops.py``: history per group, graph, account attributes, post side) and the log's
    clock (origin, training cutoff, window)."""

    origin_us: int
    cutoff_us: int
    window_hours: int
    ops: list[FeatureOp]
    saved_parts: list[str] = field(default_factory=list)  # what the Ray executor's tasks already wrote

    def op(self, kind: type[FeatureOp]) -> Any:
        return feature_ops.first(self.ops, kind)

    @property
    def apply_tables(self) -> dict[str, pl.DataFrame]:
        return {op.prefix: op.apply for op in self.ops if isinstance(op, History)}

    def _of(self, kind: type[FeatureOp], attribute: str) -> Any:
        op = self.op(kind)
        return None if op is None else getattr(op, attribute)

    @property
    def graph(self) -> Any:
        return self._of(Graph, "model")

    @property
    def users(self) -> pl.DataFrame | None:
        return self._of(Accounts, "users")

    @property
    def posts(self) -> pl.DataFrame | None:
        return self._of(PostSide, "posts")

    @property
    def topics(self) -> pl.DataFrame | None:
        return self._of(PostSide, "topics")

    def provenance(self) -> dict[str, Provenance]:
        """Column → the op that made it; the post side's columns are the post ops' (the post state says)."""
        return feature_ops.provenance([op for op in self.ops if not isinstance(op, PostSide)])

    def save(self, uri: str, storage=None) -> None:
        for op in self.ops:
            op.save(uri, storage, set(self.saved_parts))
        side = self.op(PostSide)
        io.write_json(io.join(uri, "state.json"), {
            "origin_us": self.origin_us, "cutoff_us": self.cutoff_us, "window_hours": self.window_hours,
            "ops": [op.name for op in self.ops], "history": [op.prefix for op in self.ops if isinstance(op, History)],
            "topics": (side is not None and side.topics is not None) or "topics" in self.saved_parts}, storage)

    @classmethod
    def load(cls, uri: str, storage=None, snapshot: Snapshot = "latest") -> ImpressionState:
        """Every op the state names; one saved before the ops had names has its groups' history, then the rest.
        ``snapshot``: the history a loaded run serves from (``History.load_group``)."""
        meta = io.read_json(io.join(uri, "state.json"), storage)
        names = meta.get("ops") or [f"history_{p}" for p in GROUPS if p in meta["history"]] + list(IMPRESSION_OPS)
        return cls(meta["origin_us"], meta["cutoff_us"], meta["window_hours"],
                   [History.load_group(uri, storage, name.removeprefix("history_"), snapshot)
                    if name.startswith("history_")
                    else IMPRESSION_OPS[name].load(uri, storage, meta, {}, snapshot) for name in names])

    def index_for_lookups(self) -> None:
        """Serving (a loaded run): history, users, posts, topics and graph ids answer a few keys by index."""
        for op in self.ops:
            op.index_for_lookups()


def read_parts(uri: str, storage=None) -> pl.DataFrame:
    """Every Parquet part under ``uri`` as one frame (a partitioned table, read whole)."""
    import pyarrow.parquet as pq

    fs, _ = io.filesystem(uri, storage)
    files = [f for f in io.list_files(uri, storage) if f.endswith(".parquet")]
    return pl.from_arrow(pq.read_table(files, filesystem=fs))
