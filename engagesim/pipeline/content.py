"""The content job: data → captions → examples → LoRA LLM → hashtags → image LoRA → a content run.

``run(config)`` is what ``jobs/content.py`` and ``engagesim pipeline content``
call. The run directory it writes is everything ``engagesim generate`` needs:
the adapter, the hashtag model, account profiles and the behaviour run that
ranks candidates (trained here on the same data when none is configured).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import polars as pl

from engagesim import io
from engagesim.config import AppConfig
from engagesim.pipeline.run import Run, Timer


def captions_stage(job: Run, posts_uri: str, log: Callable[[str], None]) -> pl.DataFrame:
    """Captions of every post: the source file's own caption column first, our captioner for post photos."""
    from engagesim.content.captions import caption_posts
    from engagesim.content.examples import source_captions

    cfg = job.config
    frames = []
    if cfg.data.source == "adobe":
        frames.append(source_captions(io.expand_paths(cfg.data.paths), cfg.storage))
    cap = cfg.content.captions
    summary = caption_posts(posts_uri, job.path("captions"), cap.model, cfg.storage, cap.actors, cap.cpus_per_actor,
                            cap.batch_size, cfg.embed.fetch_http)
    captioned = pl.from_arrow(summary.pop("table")).filter(pl.col("caption").is_not_null())
    frames.append(captioned.select("post_id", "caption"))
    captions = pl.concat(frames).unique("post_id", keep="first")
    log(f"captions: {len(frames[0]) if len(frames) > 1 else 0} from the source file, "
        f"{summary['captioned']} of {summary['photos']} photos captioned by {cap.model}"
        + (f" ({summary['failed']} unreadable: reasons in {job.path('captions')})" if summary["failed"] else ""))
    return captions


def llm_stage(job: Run, train: pl.DataFrame, valid: pl.DataFrame, log: Callable[[str], None]) -> dict[str, Any]:
    from engagesim.content import llm

    cfg = job.config.content.llm
    cache_dir = str(Path(cfg.cache_dir).resolve())
    tuned_on = train.filter(pl.col("source").is_in(cfg.sources))
    if cfg.max_examples:
        tuned_on = tuned_on.tail(cfg.max_examples)
    held_out = valid.filter(pl.col("source").is_in(cfg.sources))
    if tuned_on.is_empty() or held_out.is_empty():
        raise ValueError(f"content.llm.sources={cfg.sources}: no training or held-out posts from these sources")
    tokenizer = llm.load_tokenizer(cfg.model, cache_dir)
    eval_rows = held_out.head(max(cfg.eval_examples, 1) * 4)  # loss on a few hundred held-out posts at most
    train_table = llm.encode_table(tokenizer, tuned_on["prompt"].to_list(), tuned_on["text"].to_list(), cfg.max_length)
    valid_table = llm.encode_table(tokenizer, eval_rows["prompt"].to_list(), eval_rows["text"].to_list(),
                                   cfg.max_length)
    log(f"LLM: LoRA on {cfg.model} with {train_table.num_rows} posts, {cfg.workers} worker(s)"
        f"{', DeepSpeed ZeRO-2' if cfg.deepspeed else ''}")
    result = llm.fit_ray(train_table, valid_table, cfg, job.path("checkpoints"), "llm")
    adapter = job.path("models", "llm", "adapter")
    if Path(adapter).exists():
        shutil.rmtree(adapter)
    result.checkpoint.to_directory(adapter)
    for extra in Path(adapter).glob("optimizer*"):  # training state, not part of the adapter
        extra.unlink()
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["train_posts"], metrics["valid_posts"] = train_table.num_rows, valid_table.num_rows
    metrics["perplexity_before"] = float(np.exp(metrics["valid_loss_before"]))
    metrics["perplexity_after"] = float(np.exp(metrics["valid_loss_after"]))
    log(f"LLM held-out loss {metrics['valid_loss_before']:.3f} → {metrics['valid_loss_after']:.3f} "
        f"(perplexity {metrics['perplexity_before']:.1f} → {metrics['perplexity_after']:.1f})")
    if cfg.eval_examples:
        metrics.update(generation_eval(job, held_out.head(cfg.eval_examples), cache_dir, adapter))
        log(f"LLM generation vs real posts: BLEU {metrics['bleu_base']:.2f} → {metrics['bleu_tuned']:.2f}, "
            f"ROUGE-L {metrics['rouge_l_base']:.3f} → {metrics['rouge_l_tuned']:.3f}")
    if cfg.merge:
        merged = merge_adapter(cfg.model, cache_dir, adapter, job.path("models", "llm", "merged"))
        metrics["merged"] = merged
    return metrics


def generation_eval(job: Run, rows: pl.DataFrame, cache_dir: str, adapter: str) -> dict[str, Any]:
    """BLEU and ROUGE-L of greedy generations against the real held-out posts, base model vs tuned."""
    from engagesim.content.llm import Generator
    from engagesim.metrics import text_scores

    cfg = job.config.content.llm
    prompts, references = rows["prompt"].to_list(), rows["text"].to_list()
    out: dict[str, Any] = {"generated_posts": len(prompts)}
    samples = {"prompt": prompts, "real": references}
    generator = Generator(cfg.model, cache_dir, adapter=adapter)
    for name in ("base", "tuned"):
        with generator.base_only() if name == "base" else contextlib.nullcontext():
            texts = [t[0] for batch in range(0, len(prompts), 8)
                     for t in generator.generate(prompts[batch:batch + 8], greedy=True,
                                                 max_new_tokens=cfg.max_new_tokens)]
        scores = text_scores(texts, references)
        out[f"bleu_{name}"], out[f"rouge_l_{name}"] = scores["bleu"], scores["rouge_l"]
        samples[name] = texts
    io.write_json(job.path("reports", "content", "samples.json"),
                  [dict(zip(samples, values)) for values in zip(*samples.values())])
    return out


def merge_adapter(model: str, cache_dir: str, adapter: str, out: str) -> str:
    from engagesim.content.llm import Generator

    generator = Generator(model, cache_dir, adapter=adapter, device="cpu")
    merged = generator.model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    generator.tokenizer.save_pretrained(out)
    return out


def hashtags_stage(job: Run, train: pl.DataFrame, valid: pl.DataFrame, log: Callable[[str], None]) -> dict[str, Any]:
    from engagesim.content.hashtags import FrequencyBaseline, HashtagModel, evaluate, model_input

    cfg = job.config.content.hashtags

    def inputs(frame: pl.DataFrame) -> list[str]:
        return [model_input(t, c, a) for t, c, a in zip(frame["text"], frame["caption"], frame["username"])]

    truth = valid["hashtags"].to_list()
    model = HashtagModel().fit(inputs(train), train["hashtags"].to_list(), train["username"].to_list(),
                               cfg.min_count, cfg.max_tags, cfg.c, cfg.history_weight)
    model.save(job.path("models", "hashtags"), job.config.storage)
    baseline = FrequencyBaseline().fit(train["username"].to_list(), train["hashtags"].to_list())
    metrics: dict[str, Any] = {"vocabulary": len(model.labels)}
    for k in sorted({1, cfg.k}):
        metrics[f"model@{k}"] = evaluate(model.predict(inputs(valid), valid["username"].to_list(), k), truth, k)
        metrics[f"baseline@{k}"] = evaluate(baseline.predict(valid["username"].to_list(), k), truth, k)
    k = cfg.k
    log(f"hashtags: precision@{k} {metrics[f'model@{k}'][f'precision@{k}']:.3f} vs account-frequency baseline "
        f"{metrics[f'baseline@{k}'][f'precision@{k}']:.3f}; BLEU {metrics[f'model@{k}']['bleu']:.2f} vs "
        f"{metrics[f'baseline@{k}']['bleu']:.2f} ({metrics[f'model@{k}']['posts']} held-out posts with hashtags)")
    return metrics


def images_stage(job: Run, posts_uri: str, captions: pl.DataFrame, log: Callable[[str], None]) -> dict[str, Any]:
    """Image LoRA on (photo, caption) pairs and one sample PNG; skipped with a reason when no model is set."""
    from engagesim.content import images
    from engagesim.content.captions import photo_rows
    from engagesim.embed.actors import fetch
    from engagesim.features.image_stats import decode

    cfg = job.config.content.images
    pairs = pl.from_arrow(photo_rows(io.read_table(posts_uri, job.config.storage, columns=["post_id", "media"])))
    pairs = pairs.join(captions, on="post_id", how="inner").head(cfg.max_images)
    pipe = images.load_pipeline(cfg.model)
    size = cfg.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pictures, prompts = [], []
    for uri, caption in zip(pairs["photo_uri"], pairs["caption"]):
        try:
            pictures.append(decode(fetch(uri, job.config.storage, job.config.embed.fetch_http), size))
            prompts.append(caption)
        except Exception:  # unreadable media was already recorded by the captions stage
            continue
    if not pictures:
        raise ValueError("content.images: no readable (photo, caption) pairs to tune the image LoRA on")
    result = images.train_lora(pipe, pictures, prompts, cfg.steps, cfg.lr, cfg.lora_r, cfg.lora_alpha,
                               cfg.batch_size, size)
    lora = images.save_lora(pipe, job.path("models", "images", "lora"))
    sample = job.path("reports", "content", "sample.png")
    io.write_bytes(sample, images.generate_png(pipe, prompts[0], cfg.inference_steps, size))
    _plot_losses(result.train_losses, job.path("reports", "content", "image_lora_loss.png"))
    log(f"image LoRA on {len(pictures)} pairs: denoising loss {result.loss_before:.4f} → {result.loss_after:.4f}")
    return {"pairs": len(pictures), "steps": result.steps, "loss_before": result.loss_before,
            "loss_after": result.loss_after, "lora": lora, "sample": sample,
            "random_weights": bool(getattr(pipe, "engagesim_random_weights", False))}


def _plot_losses(losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engagesim.report import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, alpha=0.4, label="step")
    window = max(1, len(losses) // 10)
    ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising MSE")
    ax.set_title("Image LoRA training loss")
    ax.legend()
    save_figure(fig, Path(path))


def behaviour_stage(job: Run, log: Callable[[str], None]) -> str:
    """The behaviour run that ranks candidates: the configured one, else one trained on the same data."""
    from engagesim.pipeline.behaviour import run as run_behaviour
    from engagesim.runs import load_run

    if job.config.content.behaviour_run:
        load_run(job.config.content.behaviour_run, job.config.storage)  # fails early if it is not a run
        return job.config.content.behaviour_run
    run_id = f"{job.manifest['run_id']}-behaviour"
    log(f"behaviour run for ranking: training {run_id} on the same data")
    return run_behaviour(job.config, run_id, log=lambda m: log(f"  {m}")).uri


class Examples(NamedTuple):
    posts_uri: str
    captions: pl.DataFrame
    all: pl.DataFrame
    train: pl.DataFrame
    valid: pl.DataFrame  # held out: the latest content.valid_fraction


def examples_stage(job: Run, log: Callable[[str], None]) -> Examples:
    """data → captions → (prompt, post) examples, split forward in time."""
    from engagesim.content.examples import build_examples, split_forward
    from engagesim.pipeline.behaviour import data_stage

    config = job.config
    with Timer() as t:
        datasets = data_stage(job)
    job.stage("data", datasets, t.seconds)
    with Timer() as t:
        captions = captions_stage(job, datasets["posts"], log)
    job.stage("captions", {"captions": job.path("captions")}, t.seconds)
    examples = build_examples(io.read_table(datasets["posts"], config.storage), captions, config.data.source)
    train, valid = split_forward(examples, config.content.valid_fraction)
    return Examples(datasets["posts"], captions, examples, train, valid)


def run_llm_only(config: AppConfig, run_id: str | None = None,
                 log: Callable[[str], None] = print) -> tuple[Run, dict[str, Any]]:
    """Only the LLM part of the content job (``engagesim content train-llm``): examples → LoRA + its scores."""
    with Run.open(config, "content-llm", run_id, log) as job:
        ex = examples_stage(job, log)
        metrics = llm_stage(job, ex.train, ex.valid, log)
        job.metrics("llm", metrics)
    return job, metrics


def run(config: AppConfig, run_id: str | None = None, log: Callable[[str], None] = print) -> Run:
    from engagesim.content.examples import account_profiles
    from engagesim.errors import require_extra

    require_extra("content")  # before a run directory is made

    with Run.open(config, "content", run_id, log) as job:
        ex = examples_stage(job, log)
        examples, train, valid = ex.all, ex.train, ex.valid
        for name, frame in (("train", train), ("valid", valid)):
            io.write_bytes(job.path("content", f"{name}.parquet"), _parquet_bytes(frame), config.storage)
        accounts_uri = job.path("content", "accounts.json")
        io.write_json(accounts_uri, account_profiles(train), config.storage)
        job.metrics("examples", {"train": len(train), "valid": len(valid),
                                 "with_caption": int(examples["caption"].is_not_null().sum())})
        log(f"examples: {len(train)} train, {len(valid)} held out (latest {config.content.valid_fraction:.0%})")

        stages = config.content.stages
        if "llm" in stages:
            with Timer() as t:
                job.metrics("llm", llm_stage(job, train, valid, log))
            job.stage("llm", {"adapter": job.path("models", "llm", "adapter")}, t.seconds)
        if "hashtags" in stages:
            with Timer() as t:
                job.metrics("hashtags", hashtags_stage(job, train, valid, log))
            job.stage("hashtags", {"model": job.path("models", "hashtags")}, t.seconds)
        spec_images = None
        if "images" in stages and config.content.images.model:
            with Timer() as t:
                image_metrics = images_stage(job, ex.posts_uri, ex.captions, log)
            job.metrics("images", image_metrics)
            job.stage("images", {"lora": image_metrics["lora"], "sample": image_metrics["sample"]}, t.seconds)
            spec_images = {"model": config.content.images.model, "lora": image_metrics["lora"],
                           "inference_steps": config.content.images.inference_steps, "size": config.content.images.size}
        elif "images" in stages:
            job.stage("images", {}, 0.0, skipped="content.images.model is not set (no diffusion weights offline)")
        behaviour_uri = None
        if "llm" in stages:  # ranking generated candidates needs both
            with Timer() as t:
                behaviour_uri = behaviour_stage(job, log)
            job.stage("behaviour", {"run": behaviour_uri}, t.seconds)
        job.manifest["content"] = {
            "llm_model": config.content.llm.model, "cache_dir": str(Path(config.content.llm.cache_dir).resolve()),
            "adapter": job.path("models", "llm", "adapter") if "llm" in stages else None,
            "hashtags": job.path("models", "hashtags") if "hashtags" in stages else None,
            "accounts": accounts_uri, "captions_model": config.content.captions.model, "images": spec_images,
            "behaviour_run": behaviour_uri,
        }
        job.save()
    log(json.dumps({"run": job.uri, "status": job.manifest["status"]}))
    return job


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    frame.write_parquet(buf, compression="zstd")
    return buf.getvalue()
