"""Simulate before you post: N generated candidates for an account and time, ranked by the behaviour model.

``ContentSimulator`` opens a content run (the tuned LLM adapter, the hashtag
model, account profiles, the captioner setting and the behaviour run it was
paired with) and answers one request: caption the image if one is given,
build the prompt, sample N posts, append hashtags, score every candidate with
the behaviour ensemble (the same ``load_run().predict`` as serving) and
return them best first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import numpy as np

from engagesim import io
from engagesim.content.hashtags import HashtagModel, extract_hashtags, model_input
from engagesim.content.prompts import PostContext, build_prompt


def with_hashtags(text: str, tags: list[str], k: int) -> tuple[str, list[str]]:
    """The post with up to ``k`` hashtags: its own first, then proposed ones it lacks."""
    have = extract_hashtags(text)
    lower = {t.lower() for t in have}
    added = [t for t in tags if t.lower() not in lower][: max(0, k - len(have))]
    post = " ".join([text.strip(), *(f"#{t}" for t in added)]).strip()
    return post, have + added


class ContentSimulator:
    def __init__(self, run_uri: str, behaviour_run: str | None = None, storage=None):
        from engagesim.content.llm import Generator
        from engagesim.runs import load_run

        self.uri = run_uri
        manifest = io.read_json(io.join(run_uri, "manifest.json"), storage)
        if manifest.get("job") != "content" or "content" not in manifest:
            raise ValueError(f"{run_uri} is not a finished content run (no 'content' section in its manifest)")
        self.spec: dict[str, Any] = manifest["content"]
        self.config = manifest["config"]["content"]
        if not self.spec.get("adapter") or not self.spec.get("hashtags"):
            raise ValueError(f"{run_uri} was run without the llm and hashtags stages (content.stages); "
                             "generation needs both")
        self.generator = Generator(self.spec["llm_model"], self.spec["cache_dir"], adapter=self.spec["adapter"])
        self.hashtags = HashtagModel.load(self.spec["hashtags"], storage)
        self.accounts: dict[str, dict] = io.read_json(self.spec["accounts"], storage)
        behaviour = behaviour_run or self.spec.get("behaviour_run")
        if not behaviour:
            raise ValueError("no behaviour run to rank candidates: pass --behaviour-run or set content.behaviour_run")
        self.behaviour = load_run(behaviour, storage)
        self.behaviour_uri = behaviour
        self._captioner = None
        self._pipeline = None
        known = [p["likes_p90"] for p in self.accounts.values() if p.get("likes_p90") is not None]
        self.default_target = int(np.median(known)) if known else None

    def caption(self, image_path: str) -> str:
        from engagesim.content.captions import Captioner
        from engagesim.features.image_stats import decode

        if self._captioner is None:
            self._captioner = Captioner(self.spec["captions_model"])
        return self._captioner([decode(io.read_bytes(image_path), 224)])[0]

    def simulate(self, account: str, created_at: dt.datetime, n: int = 8, company: str | None = None,
                 image_path: str | None = None, target_likes: int | None = None, seed: int = 0,
                 image_out: str | None = None) -> dict[str, Any]:
        """The ranked candidates (best first) with predicted likes and their 80 % interval."""
        created_at = created_at if created_at.tzinfo else created_at.replace(tzinfo=dt.timezone.utc)
        profile = self.accounts.get(account, {})
        company = company or profile.get("company")
        caption = self.caption(image_path) if image_path else None
        target = target_likes if target_likes is not None else profile.get("likes_p90")
        target = self.default_target if target is None else target  # an account whose posts had no likes column
        media_kinds = ("photo",) if image_path else ()
        prompt = build_prompt(PostContext(account=account, created_at=created_at, company=company, caption=caption,
                                          media_kinds=media_kinds, target_likes=target))
        llm = self.config["llm"]
        texts = self.generator.generate([prompt], n=n, max_new_tokens=llm["max_new_tokens"],
                                        temperature=llm["temperature"], top_p=llm["top_p"], seed=seed)[0]
        k = self.config["hashtags"]["k"]
        proposed = self.hashtags.predict([model_input(t, caption, account) for t in texts], [account] * len(texts), k)
        posts, tags = zip(*(with_hashtags(t, p, k) for t, p in zip(texts, proposed)))
        media = [{"kind": "photo", "uri": image_path}] if image_path else []
        rows = [{"post_id": "gen-" + hashlib.sha1(f"{account}\0{created_at}\0{i}\0{p}".encode()).hexdigest()[:16],
                 "author_id": profile.get("author_id", account), "username": account, "company": company, "text": p, "media": media,
                 "created_at": created_at} for i, p in enumerate(posts)]
        scores = self.behaviour.predict(rows).to_pylist()
        candidates = [{"text": post, "hashtags": list(tag_list), "expected_likes": float(s["expected_likes"]),
                       "likes_low": float(s["likes_low"]), "likes_high": float(s["likes_high"]),
                       "log1p_likes": float(s["log1p_likes"])}
                      for post, tag_list, s in zip(posts, tags, scores)]
        candidates.sort(key=lambda c: -c["log1p_likes"])
        for rank, c in enumerate(candidates, 1):
            c["rank"] = rank
        result = {"account": account, "created_at": created_at.isoformat(), "company": company, "prompt": prompt,
                  "caption": caption, "target_likes": target, "candidates": candidates,
                  "behaviour_run": self.behaviour_uri, "content_run": self.uri}
        if image_out and candidates:
            result["image"] = self.draw(candidates[0]["text"], caption, company, image_out, seed)
        return result

    def draw(self, text: str, caption: str | None, company: str | None, out_path: str, seed: int = 0) -> str:
        """An image for the post from the run's diffusion pipeline (+ its LoRA), written as PNG."""
        from engagesim.content.images import generate_png, image_prompt, load_pipeline

        images = self.spec.get("images")
        if not images:
            raise ValueError("this content run has no image model (content.images.model was not set)")
        if self._pipeline is None:
            self._pipeline = load_pipeline(images["model"])
            if images.get("lora"):
                self._pipeline.load_lora_weights(images["lora"])
        png = generate_png(self._pipeline, image_prompt(text, caption, company), steps=images["inference_steps"],
                           size=images.get("size"), seed=seed)
        io.write_bytes(out_path, png)
        return out_path
