"""thresher.data: corpus readers/writers, tokenisation, packing and the embedded default corpus."""
