"""Diffusion planners, one model per file (DiffusionDrive, Trajectory Diffuser, AAMDM): none is here yet. Each will be
one more model kind behind the decision contract (policy/contract.py), registered in deploy/kinds.py."""
