"""The post state's ops over embedding blocks (features/ops.py): PCA, text clusters and the vectors themselves.

PCA's parts are the moments n, Σx, Σxxᵀ of each block's training rows and k-means' a bounded hash sample of
training posts: small, fixed-size parts the executor folds one at a time, whatever the number of posts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from engagesim.features import post_fit
from engagesim.features.lookup import frame
from engagesim.features.ops import Apply, FeatureOp, Provenance, Rows
from engagesim.features.post_ops import EMBEDDING_BLOCKS, NO_LABELS, block_matrix, valid_block


@dataclass
class Projection:
    """A PCA basis applied as (x - mean) @ components.T — the same arithmetic for fit rows and new rows."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: float

    @classmethod
    def fit(cls, x: np.ndarray, k: int) -> Projection:
        return cls.from_moments(post_fit.moments_partial(x), k)

    @classmethod
    def from_moments(cls, m: dict[str, np.ndarray], k: int) -> Projection:
        """The top-k eigenvectors of the covariance from n, Σx and Σxxᵀ (summed over blocks). Each
        component's sign makes its largest-magnitude loading positive, so every executor agrees."""
        n = float(m["n"][0])
        mean = m["sum"] / n
        cov = (m["outer"] - n * np.outer(mean, mean)) / max(n - 1, 1)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1]
        k = max(1, min(k, cov.shape[0], int(n) - 1))
        comps = vectors[:, order[:k]].T
        comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
        total = float(np.clip(values, 0, None).sum())
        return cls(mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32),
                   float(np.clip(values[order[:k]], 0, None).sum() / total) if total > 0 else 0.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """In float64, then rounded once: a float32 product of 1,280-wide rows differed by up to 4e-6 (several
        float32 steps at |value| ~10) between the Ray plane's blocks and one in-process matrix, since BLAS
        sums in another order for another batch shape; float64's order error is far below one float32 step."""
        x = np.asarray(x, np.float64)
        return ((x - self.mean.astype(np.float64)) @ self.components.T.astype(np.float64)).astype(np.float32)

    def apply_rows(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``apply`` of a block whose null rows count as zeros (``block_matrix``), projecting only the non-null
        rows (``valid_block``): a null row's answer is the zero vector's, the same for each. Most posts carry no
        image, so most of a scoring block's 1,280-wide image rows were zeros converted to float64 and
        multiplied (4,096 posts of which 19 had a photo: 22–35 ms of the block's ~280 ms, profiled)."""
        out = np.empty((len(valid), self.components.shape[0]), dtype=np.float32)
        if valid.any():
            out[valid] = self.apply(values)
        if not valid.all():
            out[~valid] = self.apply(np.zeros((1, self.mean.shape[0]), dtype=np.float32))[0]
        return out


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centres.T + (centres * centres).sum(1)
    return d.argmin(1).astype(np.int32)


class Projections(FeatureOp):
    """``embed.pca_components`` principal components of each embedding block (text, sketch, image)."""

    name, provenance = "pca", Provenance("PCA of embeddings (fit on train rows)", "unsupervised: no labels")
    fits = True

    def __init__(self, components: int = 16, projections: dict[str, Projection] | None = None):
        self.components, self.projections = components, projections or {}

    def fit_partial(self, rows: Rows) -> dict[str, np.ndarray]:
        out = {}
        for column, prefix in EMBEDDING_BLOCKS:
            if column in rows.df.columns:
                keep = rows.train & rows.df[column].is_not_null().to_numpy()
                m = post_fit.moments_partial(block_matrix(rows.df, column)[keep])
                out.update({f"{prefix}.{k}": v for k, v in m.items()})
        return out

    def combine(self, parts: Iterable[dict[str, np.ndarray]]) -> None:
        total: dict[str, np.ndarray] = {}
        for part in parts:
            for k, v in part.items():
                total[k] = v.copy() if k not in total else total[k] + v
        for _, prefix in EMBEDDING_BLOCKS:
            m = {k: total.get(f"{prefix}.{k}") for k in ("n", "sum", "outer")}
            if m["n"] is not None and m["n"][0] >= 2:
                self.projections[prefix] = Projection.from_moments(m, self.components)

    def columns(self) -> list[str]:
        return [f"{prefix}_pca_{i}" for prefix, p in self.projections.items() for i in range(p.components.shape[0])]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        parts = []
        for column, prefix in EMBEDDING_BLOCKS:
            if column in df.columns and prefix in self.projections:
                comps = self.projections[prefix].apply_rows(*valid_block(df, column))
                parts.append(frame({f"{prefix}_pca_{i}": comps[:, i] for i in range(comps.shape[1])}))
        return pl.concat(parts, how="horizontal") if parts else None

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        out = {}
        for column, prefix in EMBEDDING_BLOCKS:
            if column in df.columns and prefix in self.projections:
                comps = self.projections[prefix].apply_rows(*valid_block(df, column))
                out.update({f"{prefix}_pca_{i}": comps[:, i] for i in range(comps.shape[1])})
        return out

    def save(self, uri, storage, skip):
        arrays = {f"{k}.mean": p.mean for k, p in self.projections.items()}
        arrays.update({f"{k}.components": p.components for k, p in self.projections.items()})
        return {"projections": {k: p.explained_variance for k, p in self.projections.items()},
                "projection_order": list(self.projections)}, arrays

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        return cls(projections={k: Projection(arrays[f"{k}.mean"], arrays[f"{k}.components"], meta["projections"][k])
                                for k in meta.get("projection_order", [])})


WORD_BUCKETS = 2**15  # hashed word ids: a fixed-size basis whatever the vocabulary (no word list to store)
WORD_DIMS = 32  # LSA dimensions of the word half


@dataclass
class WordSpace:
    """Latent semantic analysis of a post's words: hashed tf-idf (sublinear tf, l2) @ an SVD basis, row-normalised.

    Why words beside the embedding: on RecSys-format logs whose texts are a topic's wordpieces among others
    (engagesim.foreign's reference world) k-means of MiniLM embeddings agreed with the true topic at AMI 0.44,
    k-means of [words | embedding] at 0.96; on make demo's world, whose texts are sentences, 0.889 → 0.896
    (jobs measured on the runs' post tables, 24 clusters, the topic hashtag / synthetic topic as the truth)."""

    idf: np.ndarray  # (WORD_BUCKETS,)
    basis: np.ndarray  # (WORD_DIMS, WORD_BUCKETS)

    @staticmethod
    def counts(texts: list[str]):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=WORD_BUCKETS, alternate_sign=False, norm=None,
                                 dtype=np.float64).transform(texts)

    @classmethod
    def fit(cls, texts: list[str]) -> WordSpace | None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfTransformer

        counts = cls.counts(texts)
        if counts.nnz == 0 or len(texts) <= WORD_DIMS:
            return None
        idf = TfidfTransformer(sublinear_tf=True).fit(counts).idf_
        basis = TruncatedSVD(WORD_DIMS, random_state=0).fit(cls._tfidf(counts, idf)).components_
        return cls(idf.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32))

    @staticmethod
    def _tfidf(counts, idf: np.ndarray):
        from sklearn.preprocessing import normalize

        counts = counts.copy()
        counts.data = 1.0 + np.log(counts.data)
        return normalize(counts.multiply(idf.astype(np.float64, copy=False)).tocsr())

    @cached_property
    def _float64(self) -> tuple[np.ndarray, np.ndarray]:
        """idf and the basis (transposed) in float64, made once: copying the 32 × 32,768 basis per call was most
        of a served post's 4.7 ms here (0.4 ms without it)."""
        return self.idf.astype(np.float64), np.ascontiguousarray(self.basis.T, dtype=np.float64)

    def apply(self, texts: list[str]) -> np.ndarray:
        """(n, WORD_DIMS) unit rows (zero for a text without words), float64: one row's value never depends on
        the rows beside it."""
        idf, basis_t = self._float64
        z = np.asarray(self._tfidf(self.counts(texts), idf) @ basis_t)
        return _unit_rows(z)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


class TextClusters(FeatureOp):
    """The nearest of ``features.text_clusters`` k-means centres of [LSA of the words | text embedding], each
    half unit-length (``WordSpace``); runs saved before the word half cluster the embedding alone."""

    name, provenance = "text_clusters", Provenance("k-means of post words (LSA) and text embeddings (fit on "
                                                   "train rows)", "unsupervised: no labels")
    fits = True

    def __init__(self, clusters: int = 24, train_rows: int = 1, centres: np.ndarray | None = None,
                 words: WordSpace | None = None):
        self.clusters, self.centres, self.words = clusters, centres, words
        self.fraction = post_fit.KMEANS_SAMPLE / max(train_rows, 1)  # the sample's share of training posts

    def fit_partial(self, rows: Rows) -> pl.DataFrame | None:
        if "text_emb" not in rows.df.columns:
            return None
        chosen = rows.train & post_fit.in_kmeans_sample(rows.df, self.fraction)
        text = pl.col("text").fill_null("") if "text" in rows.df.columns else pl.lit("")
        return rows.df.filter(pl.Series(chosen)).select("post_id", "text_emb", text.alias("text"))

    def combine(self, parts: Iterable[pl.DataFrame | None]) -> None:
        parts = [p for p in parts if p is not None]
        sample = pl.concat(parts) if parts else None
        if sample is not None and sample.height >= self.clusters:
            from sklearn.cluster import MiniBatchKMeans

            # In post_id order: mini-batches follow row order, which a distributed gather does not keep.
            sample = sample.sort("post_id")
            self.words = WordSpace.fit(sample["text"].to_list())
            km = MiniBatchKMeans(n_clusters=self.clusters, random_state=0, n_init=3).fit(self._space(sample))
            self.centres = km.cluster_centers_.astype(np.float32)

    def _space(self, df: pl.DataFrame) -> np.ndarray:
        emb = block_matrix(df, "text_emb")
        if self.words is None:
            return emb
        text = df["text"].fill_null("").to_list() if "text" in df.columns else [""] * df.height
        return np.hstack([self.words.apply(text), _unit_rows(emb.astype(np.float64))])

    def columns(self) -> list[str]:
        return ["text_cluster"]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        if self.centres is None or "text_emb" not in df.columns:
            return None
        return pl.DataFrame({"text_cluster": nearest_centre(self._space(df), self.centres)})

    def save(self, uri, storage, skip):
        arrays = {} if self.centres is None else {"centres": self.centres}
        if self.words is not None:
            arrays.update({"words.idf": self.words.idf, "words.basis": self.words.basis})
        return {"has_centres": self.centres is not None}, arrays

    @classmethod
    def load(cls, uri, storage, meta, arrays, snapshot):
        words = WordSpace(arrays["words.idf"], arrays["words.basis"]) if "words.basis" in arrays else None
        return cls(centres=arrays.get("centres") if meta.get("has_centres") else None, words=words)


class Vectors(FeatureOp):
    """The embedding blocks themselves (MiniLM text, its sketch, EfficientNet image), for the models that read them."""

    name, provenance = "vectors", Provenance("text / image embeddings", NO_LABELS)

    def columns(self) -> list[str]:
        return [column for column, _ in EMBEDDING_BLOCKS]

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        blocks = [column for column, _ in EMBEDDING_BLOCKS if column in df.columns]
        return df.select(blocks) if blocks else None

    def arrays(self, df: pl.DataFrame, at: Apply) -> dict[str, np.ndarray]:
        return {}  # vectors, not numeric columns: what numeric_arrays of the frame would drop
