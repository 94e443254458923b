"""Deliberately broken variants of the built-in port, one or more per porting bug of
docs/porting-bugs.md (its number is the defect's `row`) plus a few extras: the catalogue `DEFECTS`
and `plant`. The broken functions live by where the defect is
(tests/planted_mixer_defects.py, planted_cache_defects.py, planted_numerics_defects.py), the
machinery that swaps them into the port in tests/planting.py, and the checkpoints rows 8 and 10
write (with a float64 numpy oracle) in tests/planted_checkpoints.py.
"""

from __future__ import annotations

from equiv.mamba2.port import Mamba2Model
from tests.planted_cache_defects import CACHE_DEFECTS, decay_from_chunk_start
from tests.planted_mixer_defects import MIXER_DEFECTS
from tests.planted_numerics_defects import NUMERICS_DEFECTS
from tests.planting import Defect, PlantedModel

DEFECTS = {d.name: d for d in sorted((*MIXER_DEFECTS, *CACHE_DEFECTS, *NUMERICS_DEFECTS),
                                     key=lambda d: int(d.row or 99))}  # porting-bugs.md order, extras last

__all__ = ["DEFECTS", "Defect", "PlantedModel", "decay_from_chunk_start", "plant"]


def plant(base: Mamba2Model, defect: Defect | str | None) -> PlantedModel:
    defect = DEFECTS[defect] if isinstance(defect, str) else defect or Defect("correct", "")
    return PlantedModel(base, defect)
