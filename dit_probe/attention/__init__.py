"""Attention maps: the recorder (``record``) and its result (``AttentionMaps``); ConceptAttention
(``concept_maps``)."""

from .concepts import ConceptMaps, concept_maps
from .maps import AXES, AttentionMaps, MapsFileError
from .recorder import Recorder, RecordingSize, RecordingTooLarge, estimate_recording, record

__all__ = ["AXES", "AttentionMaps", "ConceptMaps", "MapsFileError", "Recorder", "RecordingSize", "RecordingTooLarge",
           "concept_maps", "estimate_recording", "record"]
