"""Losses: VQGAN's perceptual + codebook + adaptive GAN loss, GAN objectives, and (per stage) others."""
