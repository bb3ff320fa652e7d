"""Inputs and outputs: BIDS datasets and naming, the diffusion scan and its gradient
table, derivative files and their sidecars, the profiles table."""
