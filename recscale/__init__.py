"""recscale: study and beat embedding collapse when scaling CTR models."""

__version__ = "0.1.0"
