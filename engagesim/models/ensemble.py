"""Ensembles: weights from validation loss (Adobe team 83) or a stacked linear model.

Loss-weighted: w_i ∝ 1 / loss_i over the models, normalised to sum to 1 —
a model twice as good on validation gets twice the say. Stacked: a ridge
(regression) or logistic (binary) model on the members' validation
predictions, fit with cross-validation so its score is honest.

The regression stacker's weights are non-negative (Breiman's stacked regressions): members are highly
correlated predictions of one target, and a free ridge on few validation rows trades them against each
other. On 55 validation rows of the Adobe split thinned to 1–3 posts an account it gave the account mean
−0.29 and kNN +0.50 and served 1.40 RMSE where its best member made 1.16 (docs/evaluation.md).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import cross_val_predict


def loss_weights(losses: dict[str, float]) -> dict[str, float]:
    inv = {k: 1.0 / max(v, 1e-12) for k, v in losses.items()}
    total = sum(inv.values())
    return {k: v / total for k, v in inv.items()}


def weighted(preds: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    return sum(weights[k] * preds[k] for k in weights)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def stacked_cv(preds: dict[str, np.ndarray], y: np.ndarray, task: str, folds: int = 5):
    """Out-of-fold stacked predictions on the validation rows, and the stacker fit on all of them."""
    names = sorted(preds)
    x = np.column_stack([logit(preds[n]) if task == "binary" else preds[n] for n in names])
    model = LogisticRegression(C=1.0, max_iter=1000) if task == "binary" else Ridge(alpha=1.0, positive=True)
    method = "predict_proba" if task == "binary" else "predict"
    import warnings

    with warnings.catch_warnings():
        # A rare engagement with fewer positives than folds: sklearn warns, stratifies what it can, and the
        # stacker still needs STACK_MIN_ROWS rows; the warning told a user nothing they could act on.
        warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
        oof = cross_val_predict(model, x, y, cv=folds, method=method)
    model.fit(x, y)
    return (oof[:, 1] if task == "binary" else oof), model, names
