"""dit_probe: mechanistic interpretability instruments for text-to-image diffusion models."""

from .adapters import get_adapter
from .attention import AttentionMaps, record
from .registry import MODELS, load_pipeline, sampling_settings
from .tiny import tiny_pipeline

__version__ = "0.1.0"
__all__ = ["AttentionMaps", "MODELS", "get_adapter", "load_pipeline", "record", "sampling_settings", "tiny_pipeline", "__version__"]
