"""facedist: distributed training for open-set face recognition."""

from facedist import _torchvision_compat  # noqa: F401  (must run before torchvision/timm import)

__version__ = "0.1.0"
