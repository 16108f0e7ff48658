"""Diffusion policies, their denoisers and accelerations."""
