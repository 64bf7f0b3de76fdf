"""Requests → predictions in one process: what a Serve replica runs, and the benchmark's baseline.

Validated requests become contract rows and go through ``LoadedRun`` — the
featurisation and models the evaluation used — so a served number equals the
evaluated one for the same row.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim.runs import LoadedRun, load_run
from engagesim.schema import ENGAGEMENTS
from engagesim.serve.api import PredictRequest, to_rows
from engagesim.serve.media import MediaFetcher, MediaPolicy


class RequestPredictor:
    def __init__(self, run_uri: str, media: MediaPolicy | None = None):
        self.run: LoadedRun = load_run(run_uri)
        self.version = self.run.run_id
        # Uploaded images live in this replica's own directory (mode 0700) only while their request is scored.
        self.upload_dir = tempfile.mkdtemp(prefix="engagesim-uploads-")
        self.media = dataclasses.replace(media or MediaPolicy(), upload_dir=self.upload_dir)
        self.max_text_chars = self.run.config.ingest.max_text_chars
        self.has_impressions = self.run.has_impression_models
        # Load models, state and encoders now, not on the first request.
        _ = self.run.post_models, self.run.post_state, self.run._encoders
        for encoder in self.run._encoders:  # request media: https on the allowlist, or this replica's uploads
            if hasattr(encoder, "fetch"):
                encoder.fetch = MediaFetcher(self.media)
        if self.has_impressions:
            _ = self.run.impression_models, self.run.impression_state

    def models(self) -> dict:
        post = self.run.post_models
        return {"model_version": self.version, "post_level": {"members": post.members,
                                                              "ensemble": (post.ensemble or {}).get("method")},
                "impression_level": {"available": self.has_impressions},
                "metrics": self.run.metrics.get("test", {})}  # the untouched test split

    def predict(self, requests: list[PredictRequest]) -> list[dict]:
        try:
            return self._predict(requests)
        finally:
            for name in os.listdir(self.upload_dir):  # scored: the uploads go (calls run one at a time)
                os.remove(os.path.join(self.upload_dir, name))

    def _predict(self, requests: list[PredictRequest]) -> list[dict]:
        posts, impressions, accounts = to_rows(requests, self.upload_dir)
        post_rows = pa.Table.from_pylist(posts)
        new_accounts = pl.DataFrame(accounts) if accounts else None
        features = self.run.featurise_posts(post_rows, new_accounts)
        scored = self.run.score_post_features(features, members="served")
        members = [c for c in scored.column_names if c.startswith("log1p_likes_")]
        explain = [i for i, r in enumerate(requests) if r.explain]
        contributions = (dict(zip(explain, self.run.post_models.contributions(features.frame[explain].to_arrow())))
                         if explain else {})
        engagement: dict[int, dict[str, float]] = {}
        if impressions:
            if not self.has_impressions:
                raise ValueError("viewer: this run has no impression-level models")
            imp = self.run.score_impressions(pa.Table.from_pylist(impressions), featurised_posts=features,
                                             members="served")  # what the ensemble reads, no more
            with_viewer = [i for i, r in enumerate(requests) if r.viewer is not None]
            p = {e: imp.column(f"p_{e}").to_numpy().tolist() for e in ENGAGEMENTS}  # not a pyarrow scalar per cell
            for row, i in enumerate(with_viewer):
                engagement[i] = {e: p[e][row] for e in ENGAGEMENTS}
        cols = {c: scored.column(c).to_numpy().tolist() for c in ["log1p_likes", "expected_likes", "likes_low",
                                                                  "likes_high", *members]}
        out = []
        for i, post in enumerate(posts):
            out.append({
                "post_id": post["post_id"],
                "likes": {"expected": _f(cols["expected_likes"][i]), "low": _f(cols["likes_low"][i]),
                          "high": _f(cols["likes_high"][i]), "log1p": _f(cols["log1p_likes"][i])},
                "engagement": engagement.get(i),
                "members": {c[len("log1p_likes_"):]: _f(cols[c][i]) for c in members},
                "top_features": contributions.get(i),
                "model_version": self.version,
            })
        return out


def _f(value: np.floating) -> float:
    return float(value)
