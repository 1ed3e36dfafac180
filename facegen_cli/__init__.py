"""facegen: attribute-controlled faces from a latent Diffusion Transformer."""
__version__ = "0.1.0"
