"""Encoders as batch callables, the model registry, sketches and the embedding cache."""
