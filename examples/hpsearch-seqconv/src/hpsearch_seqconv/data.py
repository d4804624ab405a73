"""waveforms: 1,200 noisy sequences of length 64 (sine, square, sawtooth), generated, never downloaded."""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSES = ["sine", "square", "sawtooth"]
SAMPLES, LENGTH, SEED = 1200, 64, 7


def load() -> dict[str, Any]:
    """The same arrays on every call: x (N, 1, LENGTH) float32, y class ids."""
    rng = np.random.default_rng(SEED)
    t = np.arange(LENGTH, dtype=np.float64)
    y = np.arange(SAMPLES) % len(CLASSES)
    period = rng.uniform(8, 24, SAMPLES)[:, None]
    phase = rng.uniform(0, 2 * np.pi, SAMPLES)[:, None]
    angle = 2 * np.pi * t[None, :] / period + phase
    waves = np.stack([np.sin(angle), np.sign(np.sin(angle)), 2 * ((angle / (2 * np.pi)) % 1.0) - 1])
    x = waves[y, np.arange(SAMPLES)] + rng.normal(0, 0.6, (SAMPLES, LENGTH))
    return {"x": x[:, None, :].astype(np.float32), "y": y, "task": "classification", "classes": CLASSES}
