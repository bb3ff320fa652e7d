"""Preprocessing of a diffusion series: brain mask, denoising, Gibbs ringing, runs
combined, motion and eddy correction, outlier volumes, gradient-table check."""
