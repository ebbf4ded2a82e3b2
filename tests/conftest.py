"""Shared fixtures: an offline Minari root, a tiny Hopper dataset and one tiny trained run for the session."""

import contextlib
import os
import tempfile

# Before minari/mujoco are imported anywhere: local datasets only, no network waits, offscreen rendering.
os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="trajformer-minari-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch  # noqa: E402

from trajformer.config import load_config  # noqa: E402

TINY = [
    "data.sequence_length=3", "discretizer.n_bins=20",
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
    "train.batch_size=32", "train.learning_rate=3e-3", "train.eval_every=100", "train.checkpoint_every=100",
    "train.log_every=10", "train.seed=0",
]


def _tiny_config(dataset_id: str, *overrides: str):
    return load_config(None, [f'data.dataset="{dataset_id}"', *TINY, *overrides])


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(dataset_id, *overrides): a config small enough to train in seconds on 2 cores."""
    return _tiny_config


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def torch_threads():
    """torch_threads(n): a context in which torch runs n intra-op threads (the suite's one thread restored after)."""
    @contextlib.contextmanager
    def use(n: int):
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
    return use


@pytest.fixture(scope="session", autouse=True)
def _scratch_directory(tmp_path_factory):
    """Tests run in a scratch directory: nothing they (or MuJoCo's MUJOCO_LOG.TXT) write lands in the repository."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def hopper_dataset() -> str:
    """A random-policy Hopper dataset (~3000 steps, terminations and 50-step time limits)."""
    from trajformer.collect import collect

    dataset_id = "test/hopper-random-v0"
    collect("Hopper-v5", "random", steps=3000, dataset_id=dataset_id, seed=0, max_episode_steps=50, num_envs=4)
    return dataset_id


@pytest.fixture(scope="session")
def tiny_run(hopper_dataset, tmp_path_factory):
    """One tiny model trained for 300 steps, shared by the tests that only read a run directory."""
    from trajformer.train import train

    cfg = _tiny_config(hopper_dataset, "train.max_steps=300")
    return train(cfg, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


@pytest.fixture(scope="session")
def ensemble_dir(hopper_dataset, tmp_path_factory):
    """One small ensemble (3 members of 2 x 64) on the tiny dataset, for the ensemble and prediction tests."""
    from trajformer.config import EnsembleConfig
    from trajformer.ensemble import train_ensemble

    small = EnsembleConfig(members=3, hidden=64, layers=2, max_epochs=15, patience=3, batch_size=128)
    return train_ensemble(_tiny_config(hopper_dataset), tmp_path_factory.mktemp("ens") / "e", small, progress=False)


@pytest.fixture(scope="session")
def point_datasets(tmp_path_factory):
    """A root whose datasets/ holds the point-line dataset (tests/pointline.py); runs may go beside it."""
    from pointline import make_point_dataset

    root = tmp_path_factory.mktemp("pointline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "datasets"))
        make_point_dataset(root)
    return root
