"""Model files are data, never code: a version whose weights or catalogue carry a pickled object
is refused, and the object's code does not run, even when the manifest's checksums match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import artifacts
from models.artifacts import ArtifactError, load_version, publish_version
from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.vocab import ItemVocab

ITEMS = [f"item-{i}" for i in range(30)]


def _publish(tmp_path):
    torch.manual_seed(0)
    vocab = ItemVocab(ITEMS)
    config = RankerConfig(
        ItemEmbeddingConfig(num_rows=len(vocab), dim=8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
    )
    stats = np.random.default_rng(0).random((len(vocab), 4)).astype(np.float32)
    return publish_version(tmp_path / "models", TwoPathRanker(config).eval(), vocab, stats, {})


class _Touch:
    """Unpickling this creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("name", "quantized"), [(artifacts.WEIGHTS_FP32, False), (artifacts.WEIGHTS_INT8, True)]
)
def test_pickled_code_in_the_weights_never_runs(tmp_path, name, quantized):
    folder = _publish(tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(folder / name, weights_only=True)
    state[next(iter(state))] = _Touch(marker)  # one tensor replaced by an object
    torch.save(state, folder / name)
    artifacts.write_manifest(folder)  # an attacker who can write the folder can fix the checksums
    with pytest.raises(ArtifactError):
        load_version(folder, quantized=quantized)
    assert not marker.exists(), "the loader unpickled an object from the weights file"


def test_a_pickled_object_in_the_catalogue_is_refused(tmp_path):
    folder = _publish(tmp_path)
    hostile = np.empty(len(ITEMS), dtype=object)
    hostile[:] = [_Touch(tmp_path / "pwned")] * len(ITEMS)
    with open(folder / artifacts.CATALOGUE, "wb") as fh:
        np.savez(fh, item_stats=hostile)
    artifacts.write_manifest(folder)
    with pytest.raises(ArtifactError, match="catalogue"):
        load_version(folder)
    assert not (tmp_path / "pwned").exists()
