"""thresher.comm: compression codecs (top-k, quantisers, low-rank), collectives and exact byte accounting."""
