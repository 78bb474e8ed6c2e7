"""ldmkit: latent diffusion training and latent consistency distillation."""

__version__ = "0.1.0"
