"""AlignedReID in PyTorch: model, losses, data, evaluation and re-ranking for person re-identification."""

__version__ = "0.1.0"
