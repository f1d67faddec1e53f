"""dit_probe: mechanistic interpretability instruments for text-to-image diffusion models."""

import logging as _logging
import warnings as _warnings


class _NoTorchvisionNotice(_logging.Filter):
    """dit_probe leaves torchvision out on purpose (it does not work with the CPU torch build); transformers
    announces its PIL fallback for every image processor on import. Only that notice is dropped."""

    def filter(self, record):
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
# in Jupyter without ipywidgets, importing diffusers' tqdm.auto warns about notebook progress widgets;
# dit_probe turns those progress bars off, so the notice is noise in every notebook
_warnings.filterwarnings("ignore", message="IProgress not found")

from .adapters import get_adapter  # noqa: E402
from .attention import AttentionMaps, record  # noqa: E402
from .registry import MODELS, load_pipeline, sampling_settings  # noqa: E402
from .tiny import tiny_pipeline  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AttentionMaps", "MODELS", "get_adapter", "load_pipeline", "record", "sampling_settings", "tiny_pipeline", "__version__"]
