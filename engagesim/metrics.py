"""Evaluation metrics of the source competitions, with their maths spelled out.

All functions are pure numpy (sklearn for AP) and never import Ray.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import average_precision_score

EPS = 1e-7


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error; on log1p(likes) this is the Adobe / SMP challenge metric."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (sklearn's step-wise definition).

    Equals the positive rate for a random scorer and 1 for a perfect ranking;
    undefined (NaN) when there is no positive label.
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return float("nan")
    return float(average_precision_score(labels, scores))


def cross_entropy_sum(labels: np.ndarray, probs: np.ndarray) -> float:
    """Summed binary cross entropy (natural log) with probabilities clipped to [1e-7, 1 − 1e-7]."""
    p = np.clip(np.asarray(probs, float), EPS, 1 - EPS)
    y = np.asarray(labels, float)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).sum())


def rce_from_sums(ce_model_sum: float, positives: float, count: float) -> float:
    """RCE from aggregated sums, so sharded evaluation over billions of rows is exact.

    RCE = 100 × (CE_const − CE_model) / CE_const, where CE_const is the cross
    entropy of always predicting the observed positive rate (the "naive"
    predictor of the RecSys Challenge). 0 means no better than that constant,
    100 a perfect model, negative worse than the constant. Undefined (NaN)
    when every label is the same, because CE_const is then 0.
    """
    if count == 0:
        return float("nan")
    rate = positives / count
    if rate <= 0 or rate >= 1:
        return float("nan")
    ce_const = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate)) * count
    return float(100.0 * (ce_const - ce_model_sum) / ce_const)


def rce(labels: np.ndarray, probs: np.ndarray) -> float:
    """Relative cross entropy of the RecSys Challenge 2020/2021 (see ``rce_from_sums``)."""
    labels = np.asarray(labels, float)
    return rce_from_sums(cross_entropy_sum(labels, probs), labels.sum(), len(labels))


def popularity_groups(follower_counts: np.ndarray, edges: np.ndarray | None = None, n_groups: int = 5) -> np.ndarray:
    """Group index 0..n-1 by author follower count quantiles (RecSys 2021's fairness view)."""
    counts = np.asarray(follower_counts, float)
    if edges is None:
        edges = quantile_edges(counts, n_groups)
    return np.searchsorted(edges, counts, side="right")


def quantile_edges(values: np.ndarray, n_groups: int = 5) -> np.ndarray:
    return np.quantile(np.asarray(values, float), np.linspace(0, 1, n_groups + 1)[1:-1])


def grouped(
    metric: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """The metric per group and the unweighted mean over groups (each group counts the same)."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    per = {f"group_{int(g)}": metric(labels[groups == g], scores[groups == g]) for g in np.unique(groups)}
    values = [v for v in per.values() if not np.isnan(v)]
    per["mean"] = float(np.mean(values)) if values else float("nan")
    return per


def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 13a tokenisation) and mean ROUGE-L F1 (rouge-score, stemmed)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score if hypotheses else 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu": float(bleu), "rouge_l": float(np.mean(rouge)) if rouge else 0.0}
