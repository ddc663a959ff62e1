"""thresher.core: what every package stands on -- the shared constants (``constants``), the
argument checks (``checks``), atomic file writes (``files``), the saved random state (``rng``)
and lazy package exports (``lazy``)."""
