"""Attention maps: the recorder (``record``) and its result (``AttentionMaps``)."""

from .maps import AXES, AttentionMaps
from .recorder import Recorder, record

__all__ = ["AXES", "AttentionMaps", "Recorder", "record"]
