"""The EIM editor (paper section 3.1, Eq. 1): Encode, Identify (text direction, HSDS, reference image,
SDS / DDS baselines), Manipulate. ``EIMEditor(pipe).edit(image, source, target, alphas)``."""

from .directions import EditDirection, text_direction
from .distillation import DistillSettings, dds, hsds, sds
from .editor import MODES, EditInputError, EditResult, EIMEditor, Encoded, target_phrase

__all__ = ["DistillSettings", "EIMEditor", "EditDirection", "EditInputError", "EditResult", "Encoded", "MODES",
           "dds", "hsds", "sds", "target_phrase", "text_direction"]
