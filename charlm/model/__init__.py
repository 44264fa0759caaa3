"""The network: Embedding -> RNN/LSTM/GRU -> Linear, and its single-step sampler form."""
