"""Pack a local Minari dataset small enough to travel to the lent GPU machine, and unpack it there.

    python scripts/device_pack.py pack DATASET_ID FILE.npz     # here (MINARI_DATASETS_PATH or ~/.minari/datasets)
    python scripts/device_pack.py unpack FILE.npz ROOT          # there: ROOT/DATASET_ID/data/main_data.hdf5

The device tool carries at most 64 MiB with the working tree, and Minari's float64 hdf5 of the humanoid
dataset is 97 MB. Observations and rewards travel as float32 (relative rounding ~6e-8), actions and flags as
stored; a run trained on the unpacked copy records that copy's sha256 (run.json provenance), not the original's.
"""

from __future__ import annotations

import io
import json
import lzma
import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from trajformer.data import datasets_root
from trajformer.files import atomic_write

FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")


def _shuffle(a: np.ndarray) -> bytes:
    """Bytes of `a` grouped by byte position, which xz compresses far better for floats."""
    return a.view(np.uint8).reshape(-1, a.itemsize).T.copy().tobytes()


def _unshuffle(b: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(b, np.uint8).reshape(itemsize, -1).T.copy().view(dtype).reshape(shape)


def pack(dataset_id: str, out: str) -> None:
    root = datasets_root() / dataset_id / "data"
    if not (root / "main_data.hdf5").is_file():
        raise FileNotFoundError(f"no local dataset {dataset_id!r} under {datasets_root()}; collect or download it "
                                "first")
    with h5py.File(root / "main_data.hdf5", "r") as f:
        names = sorted(f.keys(), key=lambda s: int(s.split("_")[1]))
        arrays = {k: [f[e][k][()] for e in names] for k in FIELDS}
        attrs = {e: {k: int(v) for k, v in f[e].attrs.items()} for e in names}
    header, blobs = {"dataset_id": dataset_id, "episodes": names, "attrs": attrs,
                     "metadata": (root / "metadata.json").read_text(), "fields": {}}, {}
    for k, parts in arrays.items():
        a = np.concatenate(parts)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        header["fields"][k] = {"dtype": a.dtype.str, "shape": list(a.shape), "lengths": [len(p) for p in parts]}
        blobs[k] = np.frombuffer(lzma.compress(_shuffle(a), preset=6), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **blobs)
    atomic_write(Path(out), lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    print(f"{out}: {len(buf.getvalue()) / 1e6:.1f} MB")


def unpack(path: str, root: str) -> None:
    """Write the dataset into a temp folder beside its place, then rename it there: a stopped unpack leaves no
    half-written dataset that would look local."""
    z = np.load(path)
    header = json.loads(bytes(z["header"]))
    final = Path(root) / header["dataset_id"]
    if final.exists():
        raise FileExistsError(f"{final} exists; delete it to unpack {path} again")
    fields = {k: _unshuffle(lzma.decompress(bytes(z[k])), np.dtype(h["dtype"]), tuple(h["shape"]))
              for k, h in header["fields"].items()}
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        data = staging / "data"
        data.mkdir()
        (data / "metadata.json").write_text(header["metadata"])
        with h5py.File(data / "main_data.hdf5", "w") as f:
            offsets = {k: np.concatenate([[0], np.cumsum(h["lengths"])]) for k, h in header["fields"].items()}
            for i, name in enumerate(header["episodes"]):
                g = f.create_group(name)
                for k, v in header["attrs"][name].items():
                    g.attrs[k] = np.int64(v)
                for k, a in fields.items():
                    g.create_dataset(k, data=a[offsets[k][i]:offsets[k][i + 1]])
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    namespace = Path(root) / header["dataset_id"].split("/")[0] / "namespace_metadata.json"
    if not namespace.exists():
        namespace.write_text("{}")
    print(f"{final / 'data'}: {len(header['episodes'])} episodes")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
