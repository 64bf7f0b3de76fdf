"""engagesim: simulate social-media engagement at scale on Ray."""

__version__ = "0.1.0"
