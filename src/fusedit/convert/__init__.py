"""Importers of checkpoints made by other code bases into fusedit (and exporters back, for round trips)."""

from fusedit.convert.fusedit_official import export_official, load_official, official_config

__all__ = ["export_official", "load_official", "official_config"]
