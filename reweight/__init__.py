"""CARROT: bilevel sample reweighting on frozen backbones.

``import reweight`` is light: it does not import timm, BackPACK or ``higher``; the modules that
need them import them on use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
