"""Data: reading text, the vocabulary, the bundled corpus, ids on disk and batching."""
