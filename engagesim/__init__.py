"""engagesim: simulate social-media engagement at scale on Ray."""

__version__ = "0.1.0"


def load_run(uri: str, storage=None):
    """Open a finished run directory: ``run.predict(rows)``, ``run.metrics``, ``run.manifest``."""
    from engagesim.runs import load_run as _load

    return _load(uri, storage)
