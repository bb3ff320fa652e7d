"""Science of the CST integrity pipeline: plain functions on arrays and files.

Nothing in this package imports Nipype; ``workflows`` wires these functions
into Nipype graphs.  Research use only, not a medical device.
"""

__version__ = "0.1.0"
