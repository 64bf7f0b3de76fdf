"""Ray Serve: the behaviour ensemble of a run, online (``engagesim serve --run RUN_DIR``)."""
