"""lensattr: does this attention head really do what its attention map says?"""

__version__ = "0.1.0"
