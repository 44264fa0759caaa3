"""Sampling: the sampler, beam search, sampling options and stop texts, interactive use."""
