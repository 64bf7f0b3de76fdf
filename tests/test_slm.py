"""The SLM (transformer text encoder + MLP, end to end), its MLM adaptation and its distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import run_root

from engagesim import io
from engagesim.embed.text import load_encoder
from engagesim.models import mlm, nn, slm

TINY_SLM_WORLD = ["synth.users=200", "synth.posts=500", "synth.impressions=6000", "synth.images=10", "synth.days=5",
                  "synth.rows_per_shard=6000", "synth.seed=5", "features.valid_hours=24", "embed.pca_components=4",
                  "embed.text_model=tiny:bert", "embed.image_model=tiny:clip"]


def _sentiment_task(n: int = 600, seed: int = 0):
    """The label lives only in the text; the tabular features are noise."""
    rng = np.random.default_rng(seed)
    good = rng.random(n) < 0.5
    texts = [("what great happy news today " if g else "what sad terrible news today ") + str(rng.integers(0, 5))
             for g in good]
    return texts, rng.normal(size=(n, 3)).astype(np.float32), good


def _tiny_slm(n_tabular: int, x: np.ndarray, max_length: int = 16):
    _, tokenizer, encoder = load_encoder("tiny:bert", "train.slm.encoder", add_pooling_layer=False)
    mean, std = nn.fit_normaliser(x)
    spec = slm.SLMSpec(encoder="tiny:bert", encoder_config=encoder.config.to_dict(), max_length=max_length,
                       pad_id=tokenizer.pad_token_id, n_tabular=n_tabular, n_outputs=1, task="binary",
                       hidden=[16], mean=mean, std=std, random_weights=True)
    return slm.SLMNet(spec, encoder), tokenizer


def test_slm_learns_from_text_end_to_end_with_a_lower_encoder_learning_rate():
    texts, x, good = _sentiment_task()
    model, tokenizer = _tiny_slm(3, x)
    ids = slm.token_ids(tokenizer, texts, 16)
    optimizer = slm.optimizer_for(model, lr=1e-2, encoder_lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    losses = slm.train_epochs(model, ids, x, good.astype(np.float32)[:, None], 3, 32, optimizer)
    assert losses[-1] < losses[0] * 0.2
    p = model.predict(ids, x)[:, 0]
    assert p[good].min() > p[~good].max()  # separable by text alone
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder.layer" in k for k in changed)  # the encoder itself was tuned


def test_identical_texts_are_encoded_once_with_the_same_result():
    texts, x, _ = _sentiment_task(40)
    model, tokenizer = _tiny_slm(3, x)
    ids = slm.token_ids(tokenizer, texts, 16)
    assert ids.shape == (40, 16) and len(np.unique(ids, axis=0)) == len(set(texts))
    model.eval()
    with torch.no_grad():
        together = model.pooled(torch.from_numpy(ids).long())
        alone = torch.cat([model.pooled(torch.from_numpy(ids[i:i + 1]).long()) for i in range(len(ids))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(model.logits(ids, x), model(torch.from_numpy(ids).long(), torch.from_numpy(x))
                               .detach().numpy(), atol=1e-5)


def test_student_keeps_embeddings_head_and_evenly_spaced_layers():
    assert slm.kept_layers(6, 3) == [0, 2, 5] and slm.kept_layers(6, 1) == [5] and slm.kept_layers(2, 2) == [0, 1]
    with pytest.raises(ValueError, match="train.slm.distill_layers"):
        slm.kept_layers(2, 3)
    texts, x, _ = _sentiment_task(20)
    teacher, tokenizer = _tiny_slm(3, x)
    student = slm.student_from(teacher, 1)
    t, s = teacher.state_dict(), student.state_dict()
    assert student.spec.encoder_config["num_hidden_layers"] == 1
    assert slm.parameter_count(student) < slm.parameter_count(teacher)
    torch.testing.assert_close(s["encoder.encoder.layer.0.attention.self.query.weight"],
                               t["encoder.encoder.layer.1.attention.self.query.weight"])
    torch.testing.assert_close(s["encoder.embeddings.word_embeddings.weight"],
                               t["encoder.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(s["head.0.weight"], t["head.0.weight"])


def test_distillation_pulls_the_student_towards_the_teacher():
    texts, x, good = _sentiment_task(400, seed=1)
    teacher, tokenizer = _tiny_slm(3, x)
    ids = slm.token_ids(tokenizer, texts, 16)
    y = good.astype(np.float32)[:, None]
    slm.train_epochs(teacher, ids, x, y, 3, 32, slm.optimizer_for(teacher, 1e-2, 1e-3))
    student = slm.student_from(teacher, 1)
    soft = teacher.logits(ids, x)
    gap_before = np.abs(student.predict(ids, x) - teacher.predict(ids, x)).mean()
    slm.train_epochs(student, ids, x, y, 2, 32, slm.optimizer_for(student, 1e-2, 1e-3), teacher=soft, alpha=0.0)
    assert np.abs(student.predict(ids, x) - teacher.predict(ids, x)).mean() < gap_before


def test_save_and_load_predict_identically_without_pickle(tmp_path):
    texts, x, _ = _sentiment_task(30)
    model, tokenizer = _tiny_slm(3, x)
    ids = slm.token_ids(tokenizer, texts, 16)
    slm.save(model, tokenizer, str(tmp_path / "slm"), ["a", "b", "c"])
    assert {p.suffix for p in (tmp_path / "slm").rglob("*") if p.is_file()} <= {".safetensors", ".json", ".txt"}
    loaded, loaded_tokenizer, features = slm.load(str(tmp_path / "slm"))
    assert features == ["a", "b", "c"]
    np.testing.assert_array_equal(slm.token_ids(loaded_tokenizer, texts, 16), ids)
    np.testing.assert_allclose(loaded.predict(ids, x), model.eval().predict(ids, x), atol=1e-6)


def test_mlm_head_starts_from_the_encoder_and_tied_weights_save_once():
    _, tokenizer, encoder = load_encoder("tiny:bert", "train.slm.encoder", add_pooling_layer=False)
    model, head_pretrained = mlm.mlm_model(encoder)
    assert head_pretrained is False
    torch.testing.assert_close(model.base_model.embeddings.word_embeddings.weight,
                               encoder.embeddings.word_embeddings.weight)
    state = mlm.unshared_state(model)
    assert "cls.predictions.decoder.weight" not in state  # tied to the word embeddings
    batch = mlm.masked_batch(tokenizer, ["a post about cats and dogs"] * 8, 16)
    assert (batch["labels"] != -100).any() and batch["input_ids"].shape == batch["labels"].shape
    # The masked-positions-only loss is the model's own loss (computed on every position).
    model.eval()  # no dropout: the two computations see the same activations
    torch.testing.assert_close(mlm.MaskedOnlyLoss(model)(**batch), model(**batch).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.ray
def test_slm_family_in_a_behaviour_run_is_served_by_load_run(ray_local, tmp_path):
    """Post and impression SLMs on Ray Train, with MLM adaptation and a distilled student, in one run; the run
    API predicts with them and the ensembles include them."""
    from engagesim import load_run
    from engagesim.config import load_config
    from engagesim.pipeline import behaviour

    cfg = load_config(None, [*run_root(tmp_path), *TINY_SLM_WORLD, "train.models=[slm]",
                             "train.slm.encoder=tiny:bert", "train.slm.max_length=24", "train.slm.epochs=2",
                             "train.slm.max_rows=2000", "train.slm.mlm_steps=12", "train.slm.mlm_lr=0.001",
                             "train.slm.distill_layers=1", "train.slm.lr=0.003"])
    run = behaviour.run(cfg, "slm", log=lambda _: None)
    metrics = json.loads(Path(run.uri, "manifest.json").read_text())["metrics"]
    post, impression = metrics["valid"]["post_level"], metrics["valid"]["impression_level"]
    assert {"slm", "slm_distilled"} <= set(post["models"]) and {"slm", "slm_distilled"} <= set(
        impression["models"])
    assert post["models"]["slm"]["rmse"] < post["baselines"]["global_mean"]["rmse"]
    assert impression["models"]["slm"]["like"]["rce"] > 0
    info = impression["slm"]
    assert info["random_weights"] is True and info["rows"] == 2000
    assert info["mlm"]["held_out_loss_after"] < info["mlm"]["held_out_loss_before"]
    assert info["distilled"]["layers"] == 1 and info["distilled"]["parameters"] < info["distilled"][
        "teacher_parameters"]

    loaded = load_run(run.uri, snapshot="cutoff")
    assert {"slm", "slm_distilled"} <= set(loaded.post_models.members)
    assert "p_like_slm_distilled" in io.read_table(loaded.path("predictions", "impressions")).column_names
    evaluated = pl.from_arrow(io.read_table(loaded.path("predictions", "posts")))
    raw = pl.from_arrow(io.read_table(loaded.path("data", "posts")))
    raw = raw.filter(pl.col("post_id").is_in(evaluated["post_id"].implode())).head(25)
    fresh = pl.from_arrow(loaded.predict(raw.drop("likes", "retweets", "replies", "quotes")))
    joined = evaluated.join(fresh, on="post_id", suffix="_fresh")
    assert joined.height == 25
    for member in ("slm", "slm_distilled", ""):
        column = f"log1p_likes_{member}" if member else "log1p_likes"
        assert (joined[column] - joined[f"{column}_fresh"]).abs().max() < 1e-4, column
