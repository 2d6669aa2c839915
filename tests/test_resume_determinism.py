"""A resumed fit continues exactly: same tasks, same steps, same final weights as an uninterrupted one.

And the training task stream itself: a pure function of (seed, rank, batch index), whatever the
workers, the starting point or the global RNG.
"""

import os

import lightning as L
import pytest
import torch
from fixtures import tiny_omniglot_root

from fmaml.cli import main
from fmaml.data import MetaDataModule, Omniglot, Sinusoid
from fmaml.data.tasks import random_task_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fixed execution: strategy=auto's choice follows live timings (and may be measured again after a few
# steps), so two separate runs may choose differently; these tests compare runs bit for bit.
FIXED = ["--model.execution.strategy=vmap", "--model.execution.memory=store"]
SINUSOID = ["--config", os.path.join(REPO, "configs", "sinusoid.yaml"), "--data.meta_batch_size=5", *FIXED]
OMNIGLOT = [
    "--config",
    os.path.join(REPO, "configs", "omniglot.yaml"),
    "--model.network.filters=4",
    "--data.meta_batch_size=2",
    "--model.execution.strategy=loop",
    "--model.execution.memory=store",
]
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.evaluation.num_val_tasks=4",
]


def fit(folder, *args: str):
    """`python -m fmaml fit ...` with `folder` as the working directory (its logs/ and checkpoints)."""
    folder.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return main(["fit", *args, *QUIET])
    finally:
        os.chdir(cwd)


def weights(cli) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in cli.model.network.named_parameters()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


def interrupted_and_uninterrupted(tmp_path, *args: str):
    """(weights after 6 steps in one go, weights after 3 steps + a resume to 6)."""
    whole = fit(tmp_path / "whole", *args, "--trainer.max_steps=6", "--trainer.val_check_interval=6")
    # The 3-step run saves last.ckpt after its validation at step 3; the resume finds it by `last`.
    first = fit(tmp_path / "parts", *args, "--trainer.max_steps=3", "--trainer.val_check_interval=3")
    assert first.trainer.global_step == 3
    resumed = fit(
        tmp_path / "parts",
        *args,
        "--ckpt_path=last",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
    )
    assert whole.trainer.global_step == resumed.trainer.global_step == 6
    return weights(whole), weights(resumed)


def test_sinusoid_resume_gives_the_uninterrupted_weights(tmp_path):
    whole, resumed = interrupted_and_uninterrupted(tmp_path, *SINUSOID)
    assert_same_weights(whole, resumed)


def test_omniglot_resume_gives_the_uninterrupted_weights(tmp_path, tmp_path_factory):
    root = tiny_omniglot_root(tmp_path_factory)
    whole, resumed = interrupted_and_uninterrupted(tmp_path, *OMNIGLOT, f"--data.root={root}")
    assert_same_weights(whole, resumed)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    args = [*SINUSOID, "--trainer.max_steps=3", "--trainer.val_check_interval=3"]
    a = fit(tmp_path / "a", *args)
    b = fit(tmp_path / "b", *args)
    c = fit(tmp_path / "c", *args, "--seed_everything=1")
    assert_same_weights(weights(a), weights(b))
    metrics_a, metrics_b = a.trainer.callback_metrics, b.trainer.callback_metrics
    assert metrics_a.keys() == metrics_b.keys() and "val/loss" in metrics_a
    assert all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)
    assert not torch.equal(weights(a)["layers.0.weight"], weights(c)["layers.0.weight"])


# ------------------------------------------------------------------------------- the task stream


def batches(loader, n):
    it = iter(loader)
    return [torch.cat([t.flatten().float() for pair in next(it).values() for t in pair]) for _ in range(n)]


@pytest.fixture(scope="module")
def omniglot_train(tmp_path_factory):
    dm = MetaDataModule(
        Omniglot(rotations=True), ways=5, shots=2, query_shots=3, root=tiny_omniglot_root(tmp_path_factory)
    )
    return dm._get("train")


@pytest.mark.parametrize("source", ["omniglot", "sinusoid"])
def test_stream_is_a_function_of_seed_rank_and_batch_index(source, omniglot_train):
    metadataset = (
        omniglot_train if source == "omniglot" else MetaDataModule(Sinusoid(), shots=3)._get("train")
    )

    def stream(start=0, seed=0, rank=0, workers=0, world_size=1):
        loader = random_task_loader(metadataset, 3, workers, seed, rank, world_size, position=lambda: start)
        return batches(loader, 4 - start)

    reference = stream()
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(reference[2:], stream(start=2), strict=True))  # resume
    assert all(torch.equal(a, b) for a, b in zip(reference, stream(workers=2), strict=True))
    assert not torch.equal(reference[0], reference[1])
    assert not torch.equal(reference[0], stream(rank=1, world_size=2)[0])  # each DDP process gets other tasks
    assert not torch.equal(reference[0], stream(seed=1)[0])


def test_stream_follows_seed_everything_and_the_checkpointed_seed(omniglot_train):
    L.seed_everything(5, verbose=False)
    dm = MetaDataModule(Sinusoid(), shots=3, meta_batch_size=2)
    first = batches(dm.train_dataloader(), 1)[0]
    state = dm.state_dict()
    assert state == {"train_seed": 5}
    L.seed_everything(6, verbose=False)
    other = MetaDataModule(Sinusoid(), shots=3, meta_batch_size=2)
    assert not torch.equal(first, batches(other.train_dataloader(), 1)[0])
    other.load_state_dict(state)  # what a resumed fit does before it asks for the loader
    assert torch.equal(first, batches(other.train_dataloader(), 1)[0])
