"""Requests → predictions in one process: what a Serve replica runs, and the benchmark's baseline.

Validated requests become contract rows and go through ``LoadedRun`` — the
featurisation and models the evaluation used — so a served number equals the
evaluated one for the same row.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import polars as pl

from engagesim.runs import LoadedRun, load_run
from engagesim.schema import ENGAGEMENTS
from engagesim.serve.api import PredictRequest, to_tables
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
            if any(r.post.image_base64 for r in requests):  # (a listdir per request cost ~0.1 ms)
                for name in os.listdir(self.upload_dir):  # scored: the uploads go (calls run one at a time)
                    os.remove(os.path.join(self.upload_dir, name))

    def _predict(self, requests: list[PredictRequest]) -> list[dict]:
        rows = to_tables(requests, self.upload_dir)
        new_accounts = pl.DataFrame(rows.accounts) if rows.accounts else None
        features = self.run.featurise_posts(rows.posts, new_accounts)
        # Numpy columns, not score_post_features' table (its columns were read back one by one)
        scored = self.run.post_score_columns(self.run.post_predictions(features, members="served"))
        members = [c for c in scored if c.startswith("log1p_likes_")]
        explain = [i for i, r in enumerate(requests) if r.explain]
        contributions = (dict(zip(explain, self.run.post_models.contributions(features.frame[explain].to_arrow())))
                         if explain else {})
        engagement: dict[int, dict[str, float]] = {}
        if rows.impressions is not None:
            if not self.has_impressions:
                raise ValueError("viewer: this run has no impression-level models")
            _, p = self.run.impression_predictions(rows.impressions, featurised_posts=features,
                                                   members="served")  # what the ensemble reads, no more
            for row, i in zip(p["ensemble"].tolist(), rows.with_viewer):  # Python floats, not a scalar per cell
                engagement[i] = dict(zip(ENGAGEMENTS, row))
        cols = [scored[c].tolist() for c in ["expected_likes", "likes_low", "likes_high", "log1p_likes"]]
        member_cols = [(c[len("log1p_likes_"):], scored[c].tolist()) for c in members]
        return [{"post_id": post_id,
                 "likes": {"expected": expected, "low": low, "high": high, "log1p": log1p},
                 "engagement": engagement.get(i),
                 "members": {name: values[i] for name, values in member_cols},
                 "top_features": contributions.get(i),
                 "model_version": self.version}
                for i, (post_id, expected, low, high, log1p) in enumerate(zip(rows.post_ids, *cols))]
