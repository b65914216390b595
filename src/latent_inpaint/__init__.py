"""Pluralistic image inpainting with latent codes ("Don't Look into the Dark", CVPR 2024)."""

__version__ = "0.1.0"
