"""rtdp: a real-time runtime for diffusion policies and planners. This package is the command line only."""

__version__ = "0.1.0"
