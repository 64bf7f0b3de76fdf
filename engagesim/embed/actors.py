"""Embedding stages as callable classes for Ray Data ``map_batches`` with an actor pool.

No Ray import: an actor is just an object built once (model load) and called
per batch, so a unit test can call it directly. Each caches by content hash
and reports how many rows it embedded now (vs taken from the cache).
"""

from __future__ import annotations

import urllib.request

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.embed.cache import EmbeddingCache, content_hash
from engagesim.features.image_stats import IMAGE_STAT_COLUMNS, decode, image_stats


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


class TextEmbedder:
    """clean_text → text_emb (sentence embedding) and, optionally, text_sketch (EMDE of token embeddings)."""

    def __init__(self, model: str, cache_dir: str, storage=None, sketch: bool = True, column: str = "clean_text"):
        from engagesim.embed.text import TextEncoder

        self.encoder = TextEncoder(model)
        self.cache = EmbeddingCache(cache_dir, model, storage)
        self.column = column
        self.sketcher = None
        if sketch:
            from engagesim.embed.sketch import EMDESketcher

            self.token_table = self.encoder.model.get_input_embeddings().weight.detach().float().cpu().numpy()
            self.sketcher = EMDESketcher(seed=0).fit(self.token_table)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t or "" for t in batch.column(self.column).to_pylist()]
        hashes = [content_hash(self.cache.model, t) for t in texts]
        missing = self.cache.missing(hashes)
        if missing:
            first = {h: t for h, t in zip(hashes, texts)}
            self.cache.add(missing, self.encoder([first[h] for h in missing]))
        new = set(missing)
        out = batch.append_column("text_emb", _fixed_list(self.cache.lookup(hashes, self.encoder.dim)))
        out = out.append_column("text_emb_computed", pa.array([h in new for h in hashes]))
        if self.sketcher is not None:
            ids = self.encoder.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=128)["input_ids"]
            sketches = self.sketcher.sketch([self.token_table[i] for i in ids])
            out = out.append_column("text_sketch", _fixed_list(sketches))
        return out


def fetch(uri: str, storage=None, fetch_http: bool = False, timeout: float = 5.0) -> bytes:
    if uri.startswith(("http://", "https://")):
        if not fetch_http:
            raise PermissionError("http(s) media fetching is off (embed.fetch_http)")
        with urllib.request.urlopen(uri, timeout=timeout) as response:  # noqa: S310 - user-configured media URLs
            return response.read()
    return io.read_bytes(uri, storage)


class ImageFeaturizer:
    """photo_uri → the five SMP image statistics + image_emb; unreadable media → nulls + image_error."""

    def __init__(self, model: str, cache_dir: str, storage=None, fetch_http: bool = False, stat_size: int = 128):
        from engagesim.embed.image import ImageEncoder

        self.encoder = ImageEncoder(model)
        self.cache = EmbeddingCache(cache_dir, model, storage)
        self.storage, self.fetch_http, self.stat_size = storage, fetch_http, stat_size
        # Datasets' media: any URI of the user's own data. A Serve replica swaps in serve.media.MediaFetcher.
        self.fetch = lambda uri: fetch(uri, self.storage, self.fetch_http)

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("photo_uri").to_pylist()
        n = len(uris)
        stats = np.full((n, len(IMAGE_STAT_COLUMNS)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * n
        hashes: list[str | None] = [None] * n
        pixels: dict[str, np.ndarray] = {}
        for i, uri in enumerate(uris):
            if not uri:
                continue
            try:
                data = self.fetch(uri)
                rgb = decode(data, self.stat_size)
            except Exception as exc:  # unreachable or corrupt media: a reason, not a crash
                errors[i] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            stats[i] = image_stats(rgb)
            hashes[i] = content_hash(self.cache.model, data)
            pixels.setdefault(hashes[i], rgb)
        missing = self.cache.missing([h for h in hashes if h is not None])
        if missing:
            self.cache.add(missing, self.encoder([pixels[h] for h in missing]))
        emb = np.zeros((n, self.encoder.dim), dtype=np.float32)
        ok = [i for i, h in enumerate(hashes) if h is not None]
        if ok:
            emb[ok] = self.cache.lookup([hashes[i] for i in ok], self.encoder.dim)
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        new = set(missing)
        added = {**{name: pa.array(stats[:, k], mask=~valid) for k, name in enumerate(IMAGE_STAT_COLUMNS)},
                 "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.encoder.dim,
                                                                mask=pa.array(~valid)),
                 "image_emb_computed": pa.array([h in new for h in hashes]),
                 "image_error": pa.array(errors, type=pa.string())}
        # One table, not a table per appended column (a served post's eight appends cost ~0.1 ms).
        schema = pa.schema([*batch.schema, *(pa.field(k, v.type) for k, v in added.items())], batch.schema.metadata)
        return pa.Table.from_arrays([*batch.columns, *added.values()], schema=schema)


def encoder_specs(embed, storage=None) -> list[tuple[type, dict]]:
    """The encoders the ``embed`` config turns on, as (class, constructor arguments): the one mapping from
    config to encoders, used by the features stage (Ray Data actors) and ``load_run`` (in-process)."""
    specs: list[tuple[type, dict]] = []
    if embed.text:
        specs.append((TextEmbedder, {"model": embed.text_model, "cache_dir": embed.cache_dir, "storage": storage,
                                     "sketch": embed.sketch}))
    if embed.image:
        specs.append((ImageFeaturizer, {"model": embed.image_model, "cache_dir": embed.cache_dir, "storage": storage,
                                        "fetch_http": embed.fetch_http, "stat_size": embed.image_stat_size}))
    return specs
