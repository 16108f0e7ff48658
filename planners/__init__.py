"""Diffusion planners (Trajectory Diffuser, AAMDM): later issues."""
