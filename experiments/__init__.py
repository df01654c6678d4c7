"""Reproducible experiment entry points of CARROT (they call the ``reweight`` library)."""
