"""cnn-codes: fine-tune, export and serve CNN codes (penultimate-layer embeddings)."""

__version__ = "0.1.0"
