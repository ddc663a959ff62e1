"""thresher.selection: scorers, selection strategies, BLISS, BLADE and the baselines."""
