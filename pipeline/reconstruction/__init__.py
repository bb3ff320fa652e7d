"""Diffusion models and registration: the tensor fit, fibre ODFs (CSD) and the FA
template registration that brings the atlas ROIs to the subject."""
