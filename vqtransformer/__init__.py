"""vqtransformer: two-stage, transformer-based image synthesis (VQGAN + GPT, VQ-Diffusion, ViTGAN)."""

__version__ = "0.1.0"
