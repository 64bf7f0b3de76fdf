"""Hashtag generation conditioned on the post text and its image (#okboomer), and its evaluation.

A multi-label classifier ranks a vocabulary of hashtags seen in training:
TF-IDF over the text with its hashtags removed, the image caption's words
(prefixed ``img_`` so "dog" in the text and in the picture stay distinct) and
the account, then one logistic regression per hashtag. The output is the
top-k hashtags by probability. The baseline it must beat is the account's
most frequent hashtags. Saved as safetensors (weights) + JSON (vocabularies):
nothing pickled.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from engagesim import io

HASHTAG = re.compile(r"#(\w+)", re.UNICODE)


def extract_hashtags(text: str | None) -> list[str]:
    """Hashtags in order of appearance, de-duplicated case-insensitively (first spelling kept)."""
    seen: dict[str, str] = {}
    for tag in HASHTAG.findall(text or ""):
        seen.setdefault(tag.lower(), tag)
    return list(seen.values())


def strip_hashtags(text: str | None) -> str:
    return " ".join(HASHTAG.sub(" ", text or "").split())


def model_input(text: str | None, caption: str | None, account: str | None) -> str:
    words = [strip_hashtags(text)]
    if caption:
        words.append(" ".join(f"img_{w}" for w in re.findall(r"\w+", caption.lower())))
    if account:
        words.append("acct_" + re.sub(r"\W+", "_", account.lower()))
    return " ".join(w for w in words if w)


class HashtagModel:
    """TF-IDF + one-vs-rest logistic regression over the ``max_tags`` most frequent hashtags."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.vectorizer = None
        self.coef = np.zeros((0, 0), np.float32)
        self.history: dict[str, list[tuple[str, float]]] = {}
        self.history_weight = 1.0
        self.intercept = np.zeros(0, np.float32)

    def fit(self, inputs: list[str], tags: list[list[str]], accounts: list[str] | None = None, min_count: int = 2,
            max_tags: int = 500, c: float = 4.0, history_weight: float = 1.0) -> HashtagModel:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        counts = Counter(t.lower() for row in tags for t in row)
        spelling = {t.lower(): t for row in tags for t in row}
        keep = [t for t, n in counts.most_common(max_tags) if n >= min_count]
        if not keep:
            raise ValueError(f"no hashtag occurs {min_count}+ times in the training posts; nothing to learn")
        self.labels = [spelling[t] for t in keep]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000,
                                          token_pattern=r"(?u)\b\w+\b")
        x = self.vectorizer.fit_transform(inputs)
        index = {t: i for i, t in enumerate(keep)}
        y = np.zeros((len(inputs), len(keep)), dtype=np.int8)
        for r, row in enumerate(tags):
            for t in row:
                if t.lower() in index:
                    y[r, index[t.lower()]] = 1
        coef = np.zeros((len(keep), x.shape[1]), np.float32)
        intercept = np.zeros(len(keep), np.float32)
        for j in range(len(keep)):
            if y[:, j].all():  # a tag on every post: constant
                intercept[j] = 10.0
                continue
            clf = LogisticRegression(C=c, solver="liblinear").fit(x, y[:, j])
            coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
        self.coef, self.intercept = coef, intercept
        self.history = FrequencyBaseline().fit(accounts or [""] * len(tags), tags).by_account
        self.history_weight = history_weight
        return self

    def scores(self, inputs: list[str]) -> np.ndarray:
        x = self.vectorizer.transform(inputs)
        return np.asarray(x @ self.coef.T) + self.intercept

    def predict(self, inputs: list[str], accounts: list[str] | None = None, k: int = 3) -> list[list[str]]:
        """Top-k by P(tag | text, image, account) + ``history_weight`` × the tag's share of the account's past tags.

        The history term carries brand tags the classifier's vocabulary is too sparse to hold.
        """
        if not inputs:
            return []
        probs = 1 / (1 + np.exp(-self.scores(inputs)))
        out = []
        for i, account in enumerate(accounts or [None] * len(inputs)):
            ranked = {self.labels[j]: float(probs[i, j]) for j in np.argsort(-probs[i])[: k * 4]}
            past = self.history.get(account or "", [])
            for tag, share in past:
                key = next((t for t in ranked if t.lower() == tag.lower()), tag)
                ranked[key] = ranked.get(key, 0.0) + self.history_weight * share
            out.append([t for t, _ in sorted(ranked.items(), key=lambda kv: -kv[1])[:k]])
        return out

    def save(self, uri: str, storage=None) -> None:
        from engagesim.io import safe_bytes

        io.write_bytes(io.join(uri, "weights.safetensors"),
                       safe_bytes({"coef": self.coef, "intercept": self.intercept,
                                   "idf": self.vectorizer.idf_.astype(np.float32)}), storage)
        params = {k: v for k, v in self.vectorizer.get_params().items() if k in ("ngram_range", "sublinear_tf",
                                                                               "token_pattern", "lowercase")}
        io.write_json(io.join(uri, "model.json"), {
            "labels": self.labels, "params": params, "history": self.history,
            "history_weight": self.history_weight,
            "vocabulary": {t: int(i) for t, i in self.vectorizer.vocabulary_.items()}}, storage)

    @classmethod
    def load(cls, uri: str, storage=None) -> HashtagModel:
        from safetensors.numpy import load as load_safetensors
        from sklearn.feature_extraction.text import TfidfVectorizer

        meta = io.read_json(io.join(uri, "model.json"), storage)
        weights = load_safetensors(io.read_bytes(io.join(uri, "weights.safetensors"), storage))
        model = cls()
        model.labels = meta["labels"]
        model.history = {a: [tuple(x) for x in v] for a, v in meta["history"].items()}
        model.history_weight = meta["history_weight"]
        params = dict(meta["params"], ngram_range=tuple(meta["params"]["ngram_range"]))
        model.vectorizer = TfidfVectorizer(vocabulary=meta["vocabulary"], **params)
        model.vectorizer.idf_ = weights["idf"].astype(np.float64)
        model.coef, model.intercept = weights["coef"], weights["intercept"]
        return model


class FrequencyBaseline:
    """The account's most used hashtags (falling back to the most used overall)."""

    def fit(self, accounts: list[str], tags: list[list[str]]) -> FrequencyBaseline:
        per: dict[str, Counter] = {}
        for account, row in zip(accounts, tags):
            per.setdefault(account, Counter()).update(row)
        self.by_account = {a: [(t, n / sum(c.values())) for t, n in c.most_common(20)] for a, c in per.items()}
        self.overall = [t for t, _ in Counter(t for row in tags for t in row).most_common(50)]
        return self

    def predict(self, accounts: list[str], k: int = 3) -> list[list[str]]:
        out = []
        for a in accounts:
            ranked = list(dict.fromkeys([t for t, _ in self.by_account.get(a, [])] + self.overall))
            out.append(ranked[:k])
        return out


def evaluate(predicted: list[list[str]], truth: list[list[str]], k: int) -> dict[str, float]:
    """precision@k and recall@k (case-insensitive) and corpus BLEU (sacrebleu) of '#a #b' strings.

    Only posts that have hashtags are scored: a post without any has nothing to recall.
    """
    import sacrebleu

    pairs = [(p[:k], t) for p, t in zip(predicted, truth) if t]
    if not pairs:
        return {"posts": 0, f"precision@{k}": 0.0, f"recall@{k}": 0.0, "bleu": 0.0}
    precision, recall = [], []
    for p, t in pairs:
        hits = len({x.lower() for x in p} & {x.lower() for x in t})
        precision.append(hits / max(len(p), 1))
        recall.append(hits / len(t))
    hyp = [" ".join(f"#{x.lower()}" for x in p) for p, _ in pairs]
    ref = [" ".join(f"#{x.lower()}" for x in t) for _, t in pairs]
    return {"posts": len(pairs), f"precision@{k}": float(np.mean(precision)), f"recall@{k}": float(np.mean(recall)),
            "bleu": float(sacrebleu.corpus_bleu(hyp, [ref]).score)}
