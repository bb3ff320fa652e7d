"""The clinical side: a participant's bedside scores (``participants.tsv``) and the
rule-based prognosis summary they and the CST asymmetry give."""
