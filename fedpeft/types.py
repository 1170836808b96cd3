"""Types every module shares."""

from __future__ import annotations

import numpy as np

# adapters, updates and their views: peft state-dict key -> array (``<module>.lora_A.weight``
# is r × n, ``<module>.lora_B.weight`` m × r; the task head's keys as peft names them)
State = dict[str, np.ndarray]
