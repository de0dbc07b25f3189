"""Non-IID splits of a labelled dataset across devices (Dirichlet over labels)."""

from __future__ import annotations

import numpy as np


def dirichlet_split(labels: list[str], devices: int, alpha: float, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Split example indices across devices; each label's examples go to devices in proportions
    drawn from Dirichlet(alpha) (Hsu et al., 2019). Small alpha = each device sees few labels.
    Redraws (bounded) until every device has at least `min_size` examples.

    Raises:
        ValueError: bad arguments, or no draw gave every device `min_size` examples.
    """
    if devices < 1 or not alpha > 0:
        raise ValueError(f"need devices >= 1 and alpha > 0, got {devices}, {alpha}")
    if len(labels) < devices * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {devices} devices {min_size} each")
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    by_label = {name: np.flatnonzero(np.array(labels) == name) for name in names}
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for name in names:
            idx = rng.permutation(by_label[name])
            shares = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) draw gave all {devices} devices >= {min_size} examples; "
                     "raise alpha or lower the number of devices")
