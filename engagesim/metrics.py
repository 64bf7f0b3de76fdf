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


# --- binary metrics from partial sums ----------------------------------------------------------------

LOGIT_RANGE = 12.0  # the fixed grid: logit(p) ∈ [-12, 12], p from 6e-6 to 1 − 6e-6
AP_BINS = 8192
# What a report says about AP from ``BinaryScores`` (measured in ``BinaryScores.ap``).
AP_FROM_BINS = "AP from score histograms (within 3e-5 of the exact sort from 60k rows)"


def logit_bin_edges(outputs: int, bins: int = AP_BINS) -> np.ndarray:
    """(outputs, bins − 1) edges evenly spaced in logit: for scores of unknown distribution."""
    z = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins + 1)[1:-1]
    return np.tile(1 / (1 + np.exp(-z)), (outputs, 1))


def quantile_bin_edges(sample: np.ndarray, bins: int = AP_BINS) -> np.ndarray:
    """(outputs, bins − 1) AP bin edges for each output: half at equal-count quantiles of a uniform
    sample of its scores (fine where the scores concentrate), half on the logit grid (fine in the tails,
    where the top-ranked rows that decide AP for rare labels sit)."""
    quantiles = np.quantile(np.asarray(sample, float), np.linspace(0, 1, bins // 2 + 1)[1:-1], axis=0).T
    return np.sort(np.concatenate([quantiles, logit_bin_edges(quantiles.shape[0], bins // 2 + 1)], axis=1), axis=1)


class BinaryScores:
    """Partial sums of binary-classification metrics over (outputs × groups), mergeable across blocks.

    Cross entropy, positives and counts are plain sums, so RCE is exact however the rows are split. AP
    and the curves come from per-bin positive and negative counts of the score; with ``edges`` from
    ``quantile_bin_edges`` of a sample, AP is within 3e-5 of the exact sort from 60k rows (``ap``). Group
    ``n_groups`` holds all rows. Pure numpy; a block's sums are a few MB whatever its row count, and
    sums merge only when made with the same edges.
    """

    def __init__(self, outputs: int, n_groups: int, edges: np.ndarray | None = None):
        self.edges = logit_bin_edges(outputs) if edges is None else np.asarray(edges, float)
        self.bins, self.n_groups = self.edges.shape[1] + 1, n_groups
        self.hist = np.zeros((outputs, n_groups + 1, self.bins, 2), dtype=np.int64)  # [..., 0] negatives, 1 positives
        self.psum = np.zeros((outputs, self.bins))  # Σ score per bin (all rows): calibration
        self.ce = np.zeros((outputs, n_groups + 1))

    def add(self, labels: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> "BinaryScores":
        """(n, outputs) labels and probabilities, (n,) group index in [0, n_groups)."""
        p = np.clip(np.asarray(probs, float), EPS, 1 - EPS)
        y = np.asarray(labels, float)
        ce = -(y * np.log(p) + (1 - y) * np.log1p(-p))
        g = np.asarray(groups, np.int64)
        for k in range(p.shape[1]):
            bin_of = np.searchsorted(self.edges[k], p[:, k], side="right")
            cell = (g * self.bins + bin_of) * 2 + y[:, k].astype(np.int64)
            counts = np.bincount(cell, minlength=self.n_groups * self.bins * 2).reshape(self.n_groups, self.bins, 2)
            self.hist[k, :self.n_groups] += counts
            self.hist[k, self.n_groups] += counts.sum(axis=0)
            self.psum[k] += np.bincount(bin_of, weights=p[:, k], minlength=self.bins)
            per_group = np.bincount(g, weights=ce[:, k], minlength=self.n_groups)
            self.ce[k, :self.n_groups] += per_group
            self.ce[k, self.n_groups] += per_group.sum()
        return self

    def merge(self, other: "BinaryScores") -> "BinaryScores":
        self.hist += other.hist
        self.psum += other.psum
        self.ce += other.ce
        return self

    def rce(self, output: int, group: int | None = None) -> float:
        g = self.n_groups if group is None else group
        h = self.hist[output, g]
        return rce_from_sums(self.ce[output, g], h[:, 1].sum(), h.sum())

    def ap(self, output: int, group: int | None = None) -> float:
        """AP with each bin's rows taken as randomly interleaved: the i-th of a bin's p positives (among
        p + n rows, after ``a`` positives in ``b`` rows above it) sits at b + i·(p+n+1)/(p+1) on average,
        and Σᵢ (a+i)/(b + i·c) has the closed form (p + (a − b/c)(ψ(b/c + p + 1) − ψ(b/c + 1)))/c.
        Measured against sklearn's sort with ``quantile_bin_edges`` (8192 bins, edges from a 30 % sample)
        on synthetic scores: within 3e-4 at 3k rows, 3e-5 at 60k, 1.2e-5 at 200k; on a tiny run's 8.8k
        validation rows (rare labels with < 300 positives) within 5e-4. Equal-count bins alone were off by
        4e-4 at 60k, a logit grid alone by 5e-4 where scores concentrate; the plain step sum over bins
        (sklearn's tie rule) is biased low."""
        from scipy.special import digamma

        h = self.hist[output, self.n_groups if group is None else group][::-1].astype(float)  # highest first
        pos, neg = h[:, 1], h[:, 0]
        total = pos.sum()
        if total == 0:
            return float("nan")
        above_pos, above = np.cumsum(pos) - pos, np.cumsum(pos + neg) - (pos + neg)
        m = pos > 0
        p, n, a, b = pos[m], neg[m], above_pos[m], above[m]
        c = (p + n + 1) / (p + 1)
        d = b / c
        return float(np.sum((p + (a - d) * (digamma(d + p + 1) - digamma(d + 1))) / c) / total)

    def ap_bounds(self, output: int, group: int | None = None) -> tuple[float, float]:
        """Bounds on the exact AP of the rows (sklearn's, ties included) from the bins alone, so ``hi − lo``
        bounds the histogram's error on this data: small at scale, wide on a few hundred rows with a rare label.

        A bin's p positives, n negatives, after ``a`` positives in ``b`` rows: every precision a positive of
        the bin can be credited with is (a+k)/(b+m), k ≤ p of its positives and m its rows counted. The
        lowest is the positives-last order, Σᵢ (a+i)/(B+i) with B = b+n (= p − (B − a)(ψ(B+p+1) − ψ(B+1))).
        The highest is p·(a+p)/(b+p): all p positives tied, above the bin's negatives — sklearn credits a tie
        group's positives with the precision at its end, which beats the positives-first order (1/3 + 2/4
        vs 2 · 2/4 for two tied positives under two negatives). XGBoost's leaf sums tie often; the
        positives-first bound missed an exact AP by 1.8e-4 on 1.4k rows."""
        from scipy.special import digamma

        h = self.hist[output, self.n_groups if group is None else group][::-1].astype(float)
        pos, neg = h[:, 1], h[:, 0]
        total = pos.sum()
        if total == 0:
            return float("nan"), float("nan")
        above_pos, above = np.cumsum(pos) - pos, np.cumsum(pos + neg) - (pos + neg)
        m = pos > 0
        p, n, a, b = pos[m], neg[m], above_pos[m], above[m]
        last = b + n
        lo = float(np.sum(p - (last - a) * (digamma(last + p + 1) - digamma(last + 1))) / total)
        return lo, float(np.sum(p * (a + p) / (b + p)) / total)

    @property
    def rows(self) -> int:
        return int(self.hist[0, self.n_groups].sum()) if len(self.hist) else 0

    def grouped(self, metric: str, output: int) -> dict[str, float]:
        """``metric`` ("rce" or "ap") per group that has rows and their unweighted mean, as ``grouped``."""
        fn = self.rce if metric == "rce" else self.ap
        per = {f"group_{g}": fn(output, g) for g in range(self.n_groups) if self.hist[output, g].sum()}
        values = [v for v in per.values() if not np.isnan(v)]
        per["mean"] = float(np.mean(values)) if values else float("nan")
        return per

    def curves(self, output: int, calibration_bins: int = 10) -> dict[str, np.ndarray]:
        """Precision–recall at every bin threshold, and calibration over ``calibration_bins`` quantile
        buckets of the score (whole bins: mean predicted and observed rate of each bucket's rows)."""
        h = self.hist[output, self.n_groups]
        down = h[::-1]
        tp, seen = np.cumsum(down[:, 1]), np.cumsum(down.sum(axis=1))
        keep = seen > 0
        n = h.sum(axis=1)
        bucket = np.minimum((np.cumsum(n) - n / 2) / max(n.sum(), 1) * calibration_bins, calibration_bins - 1)
        bucket = bucket.astype(int)
        count = np.bincount(bucket, weights=n, minlength=calibration_bins)
        full = count > 0
        return {"precision": tp[keep] / seen[keep], "recall": tp[keep] / max(tp[-1], 1),
                "predicted": np.bincount(bucket, weights=self.psum[output], minlength=calibration_bins)[full] / count[full],
                "observed": np.bincount(bucket, weights=h[:, 1], minlength=calibration_bins)[full] / count[full]}
