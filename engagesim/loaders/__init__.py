"""Loaders map foreign formats onto the data contracts, with a rejects dataset."""

from engagesim.loaders.coerce import parse_media
from engagesim.loaders.ingest import IngestSummary, ingest
from engagesim.loaders.readers import FORMATS

__all__ = ["FORMATS", "IngestSummary", "ingest", "parse_media"]
