"""Tractometry: 100-node profiles and asymmetry, their bootstrap uncertainty, the
detection and localisation rules, quality control, and the group level with norms."""
