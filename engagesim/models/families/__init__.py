"""The built-in model families, one module each; importing this package registers them. Registration
order is training and prediction order (a family that reads another's predictions comes after it), so
the imports below are in that order, not alphabetical."""

# isort: off
from engagesim.models.families import xgb  # noqa: F401
from engagesim.models.families import stacked_mlp  # noqa: F401
from engagesim.models.families import knn  # noqa: F401
from engagesim.models.families import nn  # noqa: F401
from engagesim.models.families import slm  # noqa: F401
from engagesim.models.families import account_mean_eb  # noqa: F401
# isort: on
