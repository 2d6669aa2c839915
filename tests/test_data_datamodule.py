"""MetaDataModule on the tiny Omniglot / MiniImageNet fixtures and the sinusoid: batch format, fixed
validation/test tasks, reproducible training tasks, config parsing."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from fixtures import tiny_omniglot_root, write_miniimagenet
from jsonargparse import ArgumentParser

from fmaml.data import (
    EvaluationTasks,
    Loading,
    MetaDataModule,
    MiniImageNet,
    Omniglot,
    Sinusoid,
    TorchmetaDataset,
    resolve_root,
)


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory)


@pytest.fixture(scope="session")
def miniimagenet_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("miniimagenet"))
    write_miniimagenet(root)
    return root


def omniglot_dm(root, **kwargs):
    args = dict(ways=5, shots=2, query_shots=3, meta_batch_size=3, evaluation=EvaluationTasks(4, 5))
    args.update(kwargs)
    dataset = args.pop("dataset", Omniglot(rotations=False))
    return MetaDataModule(dataset, root=root, **args)


def check_classification_batch(batch, tasks, ways, shots, query_shots, shape):
    assert set(batch) == {"support", "query"}
    for key, k in (("support", shots), ("query", query_shots)):
        x, y = batch[key]
        assert x.shape == (tasks, ways * k, *shape) and x.dtype == torch.float32
        assert y.shape == (tasks, ways * k) and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        for task_labels in y:  # every label 0..ways-1, k examples each
            assert torch.bincount(task_labels, minlength=ways).tolist() == [k] * ways


def all_batches(loader):
    return [(b["support"][0], b["support"][1], b["query"][0], b["query"][1]) for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for ta, tb in zip(a, b, strict=True):
        for xa, xb in zip(ta, tb, strict=True):
            assert torch.equal(xa, xb)


@pytest.mark.parametrize("rotations", [False, True])
def test_omniglot_batches(omniglot_root, rotations):
    dm = omniglot_dm(omniglot_root, dataset=Omniglot(image_size=28, rotations=rotations))
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_outputs, dm.loss, dm.in_channels, dm.input_shape) == (5, "cross_entropy", 1, (1, 28, 28))
    check_classification_batch(next(iter(dm.train_dataloader())), 3, 5, 2, 3, (1, 28, 28))
    val = all_batches(dm.val_dataloader())
    assert [v[0].shape[0] for v in val] == [3, 1]  # 4 tasks in batches of 3: the last one is partial
    check_classification_batch(dm.val_dataloader().__iter__().__next__(), 3, 5, 2, 3, (1, 28, 28))
    dm.setup("test")
    check_classification_batch(next(iter(dm.test_dataloader())), 3, 5, 2, 3, (1, 28, 28))


def test_support_and_query_are_disjoint(omniglot_root):
    dm = omniglot_dm(omniglot_root, shots=5, query_shots=15)  # all 20 drawings of each class
    x_s, y_s, x_q, y_q = all_batches(dm.val_dataloader())[0]
    for c in range(5):  # the 20 images of a class, support + query, are all different
        images = torch.cat([x_s[0][y_s[0] == c], x_q[0][y_q[0] == c]]).flatten(1)
        assert torch.unique(images, dim=0).shape[0] == 20


def test_val_test_tasks_are_fixed(omniglot_root):
    dm = omniglot_dm(omniglot_root, dataset=Omniglot(rotations=True))
    val = all_batches(dm.val_dataloader())
    assert_same_batches(val, all_batches(dm.val_dataloader()))  # next epoch
    torch.manual_seed(123)  # global RNG state must not matter
    other = omniglot_dm(omniglot_root, dataset=Omniglot(rotations=True))
    assert_same_batches(val, all_batches(other.val_dataloader()))  # another construction
    assert not torch.equal(val[0][0], all_batches(dm.test_dataloader())[0][0])
    reseeded = omniglot_dm(
        omniglot_root, dataset=Omniglot(rotations=True), evaluation=EvaluationTasks(4, 5, seed=1)
    )
    assert not torch.equal(val[0][0], all_batches(reseeded.val_dataloader())[0][0])


def test_val_tasks_are_fixed_across_processes(omniglot_root, zygote):
    # Another process, with another str-hash seed, must give the very same validation tasks. It prints its
    # hash of a string (which tells its seed from this process's) and the tasks' checksum.
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); "
        "from test_data_datamodule import omniglot_dm, all_batches; from fmaml.data import Omniglot; "
        "dm = omniglot_dm(sys.argv[1], dataset=Omniglot(rotations=True)); "
        "print(hash('fmaml'), sum(float((x * (i + 1)).sum()) "
        "for i, b in enumerate(all_batches(dm.val_dataloader())) for x in b))"
    )
    dm = omniglot_dm(omniglot_root, dataset=Omniglot(rotations=True))
    here = sum(float((x * (i + 1)).sum()) for i, b in enumerate(all_batches(dm.val_dataloader())) for x in b)
    # Forked from the zygote (tests/zygote.py: no 10+ s of imports), whose seed each interpreter draws at
    # random as it starts: the zygote's, not this process's. Where PYTHONHASHSEED pins one seed for every
    # interpreter, the zygote's too, a fresh interpreter with another seed instead.
    child = zygote.popen(["-c", code, omniglot_root], stdout=subprocess.PIPE, text=True)
    output = child.communicate(timeout=300)[0]
    assert child.returncode == 0, output
    if int(output.split()[-2]) == hash("fmaml"):
        seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        command = [sys.executable, "-c", code, omniglot_root]
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    probe, there = output.split()[-2:]
    assert int(probe) != hash("fmaml")  # another hash seed indeed
    assert float(there) == here


def test_train_tasks_are_random_and_reproducible(omniglot_root):
    def first_batches(n):
        L.seed_everything(7, verbose=False)
        it = iter(omniglot_dm(omniglot_root).train_dataloader())
        return [tuple(t for pair in next(it).values() for t in pair) for _ in range(n)]

    a, b = first_batches(2)
    assert not torch.equal(a[0], b[0])  # different tasks in consecutive batches
    assert_same_batches([a, b], first_batches(2))  # same seed, same tasks


def test_workers_give_the_same_fixed_tasks(omniglot_root):
    in_main = all_batches(omniglot_dm(omniglot_root).val_dataloader())
    dm = omniglot_dm(omniglot_root, loading=Loading(num_workers=2))
    assert_same_batches(in_main, all_batches(dm.val_dataloader()))
    check_classification_batch(next(iter(dm.train_dataloader())), 3, 5, 2, 3, (1, 28, 28))


def test_miniimagenet(miniimagenet_root):
    dm = MetaDataModule(
        MiniImageNet(image_size=32),
        ways=5,
        shots=1,
        query_shots=2,
        meta_batch_size=2,
        root=miniimagenet_root,
        evaluation=EvaluationTasks(num_val_tasks=2, num_test_tasks=2),
    )
    assert (dm.num_outputs, dm.in_channels, dm.input_shape) == (5, 3, (3, 32, 32))
    dm.prepare_data()
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        check_classification_batch(next(iter(loader)), 2, 5, 1, 2, (3, 32, 32))


def test_sinusoid():
    dm = MetaDataModule(
        Sinusoid(), shots=10, query_shots=7, meta_batch_size=4, evaluation=EvaluationTasks(num_val_tasks=6)
    )
    assert (dm.num_outputs, dm.loss, dm.input_shape, dm.in_channels) == (1, "mse", (1,), 1)
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        for key, k in (("support", 10), ("query", 7)):
            x, y = batch[key]
            assert x.shape == y.shape == (4, k, 1) and x.dtype == y.dtype == torch.float32
            assert x.abs().max() <= 5.0 and y.abs().max() <= 5.0
    val = all_batches(dm.val_dataloader())
    assert_same_batches(
        val,
        all_batches(
            MetaDataModule(
                Sinusoid(),
                shots=10,
                query_shots=7,
                meta_batch_size=4,
                evaluation=EvaluationTasks(num_val_tasks=6),
            ).val_dataloader()
        ),
    )


def test_torchmeta_escape_hatch(omniglot_root):
    harmonic = MetaDataModule(
        TorchmetaDataset("torchmeta.toy.Harmonic", task_type="regression", input_shape=[1]),
        shots=3,
        query_shots=4,
        meta_batch_size=2,
    )
    assert harmonic.loss == "mse"
    x, y = next(iter(harmonic.train_dataloader()))["query"]
    assert x.shape == (2, 4, 1) and y.dtype == torch.float32
    omniglot = TorchmetaDataset("torchmeta.datasets.Omniglot", image_size=28, input_shape=[1, 28, 28])
    dm = omniglot_dm(omniglot_root, dataset=omniglot)
    check_classification_batch(next(iter(dm.val_dataloader())), 3, 5, 2, 3, (1, 28, 28))
    with pytest.raises(ValueError, match="not an importable class"):
        omniglot_dm(omniglot_root, dataset=TorchmetaDataset("torchmeta.datasets.Nope")).setup("fit")


def test_config_with_class_path(omniglot_root):
    parser = ArgumentParser()
    parser.add_class_arguments(MetaDataModule, "data")
    cfg = parser.parse_object(
        {
            "data": {
                "dataset": {"class_path": "fmaml.data.Omniglot", "init_args": {"rotations": False}},
                "ways": 3,
                "root": omniglot_root,
            }
        }
    )
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.dataset, Omniglot) and not dm.dataset.rotations and dm.num_outputs == 3
    cfg = parser.parse_object(
        {
            "data": {
                "dataset": {
                    "class_path": "fmaml.data.TorchmetaDataset",
                    "init_args": {
                        "name": "torchmeta.toy.Harmonic",
                        "task_type": "regression",
                        "kwargs": {"num_tasks": 10},
                    },
                }
            }
        }
    )
    assert parser.instantiate(cfg).data.dataset.kwargs == {"num_tasks": 10}


def test_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FMAML_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert MetaDataModule(Sinusoid()).root == str(tmp_path / "env")
    monkeypatch.delenv("FMAML_DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    assert resolve_root(None) == str(tmp_path / "data")
