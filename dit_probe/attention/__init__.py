"""Attention maps: the recorder (``record``) and its result (``AttentionMaps``)."""

from .maps import AXES, AttentionMaps, MapsFileError
from .recorder import Recorder, record

__all__ = ["AXES", "AttentionMaps", "MapsFileError", "Recorder", "record"]
