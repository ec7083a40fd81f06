"""Training data: sources, token stores, packed corpora."""
