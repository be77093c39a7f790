"""kvlib: reproduce "From Artificial Needles to Real Haystacks" (arXiv 2406.19292)."""

__version__ = "0.1.0"
