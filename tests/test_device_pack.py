"""scripts/device_pack.py: a dataset packed to travel to a GPU machine unpacks into a Minari dataset that loads
with the original's episodes, observations and rewards rounded to float32, actions and flags exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from trajformer.data import load_episodes

SCRIPT = Path(__file__).parent.parent / "scripts" / "device_pack.py"
_spec = importlib.util.spec_from_file_location("device_pack", SCRIPT)
device_pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_pack)


def test_pack_unpack_round_trip(hopper_dataset, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(hopper_dataset).data
    original = load_episodes(hopper_dataset, cfg, download=False)
    device_pack.pack(hopper_dataset, str(tmp_path / "pack.npz"))
    device_pack.unpack(str(tmp_path / "pack.npz"), str(tmp_path / "root"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    copy = load_episodes(hopper_dataset, cfg, download=False)
    assert len(copy.episodes) == len(original.episodes) and copy.sha256 != original.sha256
    for a, b in zip(original.episodes, copy.episodes, strict=True):
        np.testing.assert_array_equal(b.obs, a.obs.astype(np.float32))
        np.testing.assert_array_equal(b.rew, a.rew.astype(np.float32))
        np.testing.assert_array_equal(b.act, a.act)
        np.testing.assert_array_equal(b.terminated, a.terminated)
        np.testing.assert_array_equal(b.truncated, a.truncated)
