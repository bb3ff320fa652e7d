"""Simulations for validation: a synthetic phantom with known CSTs, lesions implanted
into real scans, and degraded (clinical-quality) copies of a scan."""
