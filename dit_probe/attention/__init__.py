"""Attention maps: the recorder (``record``) and its result (``AttentionMaps``)."""

from .maps import AXES, AttentionMaps, MapsFileError
from .recorder import Recorder, RecordingSize, RecordingTooLarge, estimate_recording, record

__all__ = ["AXES", "AttentionMaps", "MapsFileError", "Recorder", "RecordingSize", "RecordingTooLarge",
           "estimate_recording", "record"]
