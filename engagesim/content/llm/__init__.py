"""The content LLM: base weights (``weights``), (prompt → post) examples (``data``), LoRA tuning on Ray Train
(``train``) and generation (``generate``). Text scores (BLEU, ROUGE-L) live in ``engagesim.metrics``."""

from engagesim.content.llm.data import IGNORE, collate, encode_example, encode_table, mean_loss, prompt_prefix
from engagesim.content.llm.generate import Generator
from engagesim.content.llm.train import Schedule, fit_ray, lora_model, lr_lambda
from engagesim.content.llm.weights import base_location, load_causal_lm, load_tokenizer
from engagesim.metrics import text_scores
from engagesim.models.distributed import load_optimizer, save_optimizer

__all__ = ["IGNORE", "Generator", "Schedule", "base_location", "collate", "encode_example", "encode_table",
           "fit_ray", "load_causal_lm", "load_optimizer", "load_tokenizer", "lora_model", "lr_lambda", "mean_loss",
           "prompt_prefix", "save_optimizer", "text_scores"]
