"""qmamba: vision-Mamba no-reference image quality assessment (QMamba / LQMamba, ICML 2025)."""

__version__ = "0.1.0"
