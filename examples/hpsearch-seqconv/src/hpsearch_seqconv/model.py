"""seqconv: stacked 1-D convolutions over (channels, length) sequences, global average pooling, a linear head.

hpsearch trains it with its own trainer (optimizer, schedule, early stopping, pruning); this module only
declares the architecture's hyperparameters and builds the network.
"""

from __future__ import annotations

from typing import Any

from torch import nn

hyperparameters = [
    {"name": "channels", "type": "int", "low": 8, "high": 32, "log": True, "domain": [1, 512],
     "note": "Channels of every convolution block."},
    {"name": "blocks", "type": "int", "low": 1, "high": 3, "domain": [1, 8],
     "note": "How many conv-ReLU blocks to stack."},
    {"name": "kernel", "type": "categorical", "choices": [3, 5], "allowed": [3, 5, 7, 9],
     "note": "Kernel size of each convolution (odd, so the length is kept)."},
]


def build(params: dict[str, Any], dataset: Any) -> nn.Module:
    """The network for inputs shaped (channels, length) and dataset.n_outputs classes."""
    in_channels, _length = dataset.input_shape
    width, kernel = int(params.get("channels", 16)), int(params.get("kernel", 3))
    layers: list[nn.Module] = []
    for _ in range(int(params.get("blocks", 2))):
        layers += [nn.Conv1d(in_channels, width, kernel, padding=kernel // 2), nn.ReLU()]
        in_channels = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, dataset.n_outputs)]
    return nn.Sequential(*layers)
