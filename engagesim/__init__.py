"""engagesim: simulate social-media engagement at scale on Ray."""

__version__ = "0.1.0"


def load_run(uri: str, storage=None, snapshot: str = "latest"):
    """Open a finished run directory: ``run.predict(rows)``, ``run.metrics``, ``run.manifest``.

    ``snapshot``: "latest" (serving) or "cutoff" (reproduces the run's evaluation); see ``runs.load_run``."""
    from engagesim.runs import load_run as _load

    return _load(uri, storage, snapshot)
