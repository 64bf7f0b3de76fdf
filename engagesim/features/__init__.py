"""Pure feature transforms (pyarrow/polars/numpy in → out). No Ray import here, by rule."""
