"""charlm: character-level RNN/LSTM/GRU language models."""

__version__ = "0.1.0"
