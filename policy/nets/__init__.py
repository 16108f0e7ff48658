"""Denoisers and observation encoders, one model per file."""

from .encoders import ImageEncoder, LowDimEncoder, ObservationEncoder
from .transformer import TransformerForDiffusion
from .unet1d import ConditionalUnet1D

__all__ = ["ConditionalUnet1D", "ImageEncoder", "LowDimEncoder", "ObservationEncoder", "TransformerForDiffusion"]
