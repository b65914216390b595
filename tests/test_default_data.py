"""The embedded default dataset is built offline, deterministically, from scikit-image photographs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latent_inpaint.data.default import build_default_dataset


def test_default_dataset_is_deterministic_and_varied(tmp_path):
    a = build_default_dataset(tmp_path / "a", count=20, size=32, seed=0)
    b = build_default_dataset(tmp_path / "b", count=20, size=32, seed=0)
    c = build_default_dataset(tmp_path / "c", count=20, size=32, seed=1)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 20
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert any(x.read_bytes() != z.read_bytes() for x, z in zip(a, c))
    images = [np.asarray(Image.open(p)) for p in a]
    assert all(min(im.shape[:2]) == 32 and im.shape[2] == 3 for im in images)
    assert len({im.tobytes() for im in images}) == 20  # no two crops alike
    assert len({p.name.split("_", 1)[1] for p in a}) >= 10  # drawn from many photographs
    assert not (tmp_path / "a.tmp").exists()
