"""Probing (paper section 5.1, Fig. 7): colour/object linear probes on recorded attention maps.

- ``dataset``: generate the colour x object x seed grid and store the two tokens' maps (resumable);
  ``text_features``: the text encoder's rows of the two words (the text-encoder control);
- ``probes``: scikit-learn probes with grouped cross-validation, transfer (leakage) under three scalers,
  direct probes, shuffled control and CIs;
- ``plots``: the Fig. 7-style bars, per-layer / per-step curves and example maps.
The study that composes them is ``dit_probe.studies.probing`` (``dit-probe run probing``).
"""

from .dataset import ProbeDataset, ProbeGrid, ProbingInputError, build, text_features
from .probes import ProbeDataError, ProbeSettings, direct_probe, probe

__all__ = ["ProbeDataError", "ProbeDataset", "ProbeGrid", "ProbeSettings", "ProbingInputError", "build",
           "direct_probe", "probe", "text_features"]
