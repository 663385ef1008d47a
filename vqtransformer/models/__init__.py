"""The stages' models: VQGAN (``vqgan``), GPT prior (``gpt``), VQ-Diffusion denoiser, ViTGAN."""
