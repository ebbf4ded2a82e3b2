"""trajformer: the Trajectory Transformer rebuilt on Gymnasium v5, Minari and PyTorch 2."""

__version__ = "0.1.0"
