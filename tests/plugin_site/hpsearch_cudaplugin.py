"""A model plugin that initializes CUDA when it is imported (where torch has CUDA): the mistake a worker must
catch, since it imports plugins before it forks its runners."""

from __future__ import annotations

import torch
from hpsearch_testplugins import OwnLoop

if torch.cuda.is_available():
    torch.zeros(1, device="cuda")  # at import: a CUDA context in the supervisor


class CudaAtImport(OwnLoop):
    pass
