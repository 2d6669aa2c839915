"""Issue 19, item 7: a setting that would have no effect in the run gets one warning line naming it and
saying why; a setting left at its default never warns."""

import glob
import os
import warnings

import pytest
from fixtures import TINY, config
from jsonargparse import Namespace

from fmaml.cli import MAMLCLI, main
from fmaml.data import Loading, MetaDataModule
from fmaml.data.specs import ImageFolder, Omniglot, Sinusoid, TorchmetaDataset
from fmaml.models import MLP
from fmaml.module import MAML
from fmaml.settings import grouped
from fmaml.settings_check import warn_ignored_run_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    path
    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if f"{os.sep}loggers{os.sep}" not in path
)
IGNORED = "has no effect"


def maml(**settings) -> MAML:
    return MAML(network=lambda outputs: MLP(outputs), num_outputs=1, loss="mse", **grouped(**settings))


def ignored_warnings(record) -> list[str]:
    return [str(w.message) for w in record if IGNORED in str(w.message)]


def expect_one(pattern: str):
    """pytest.warns for exactly the warning named by `pattern`, which must be a single line."""
    return pytest.warns(UserWarning, match=pattern)


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (
            dict(msl_anneal_steps=100),
            r"model\.meta_objective\.msl_anneal_steps=100 has no effect: model\.meta_objective\.multi_step_loss",
        ),
        (
            dict(multi_step_loss=True),
            r"model\.meta_objective\.multi_step_loss=True has no effect with model\.inner_loop\.steps=1",
        ),
        (
            dict(strategy="loop", auto_memory_share=0.8),
            r"model\.execution\.auto_memory_share=0\.8 has no effect: only model\.execution\.strategy=auto .*fixed \(loop\)",
        ),
        (dict(second_order_from_step=0), r"model\.inner_loop\.second_order_from_step=0 has no effect"),
        (
            dict(strategy="loop", memory="recompute"),
            r"model\.execution\.memory='recompute' has no effect with model\.inner_loop\.steps=1: .* nothing to recompute",
        ),
    ],
    ids=["msl_anneal_steps", "multi_step_loss", "auto_memory_share", "second_order_from_step=0", "recompute"],
)
def test_model_setting_without_effect_warns(settings, pattern):
    with expect_one(pattern) as record:
        maml(**settings)
    messages = ignored_warnings(record)
    assert len(messages) == 1 and "\n" not in messages[0], messages


@pytest.mark.parametrize(
    "settings",
    [
        dict(multi_step_loss=True, inner_steps=3, msl_anneal_steps=100),
        dict(strategy="auto", auto_memory_share=0.8),
        dict(second_order_from_step=10),
        dict(memory="recompute", inner_steps=2),
        dict(strategy="loop"),  # memory=auto, the default, is "store" with a fixed strategy (documented)
    ],
)
def test_model_setting_with_effect_does_not_warn(settings):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        maml(**settings)
    assert ignored_warnings(record) == []


def image_folder_with_splits(tmp_path) -> str:
    for split in ("train", "val", "test"):
        (tmp_path / "images" / split).mkdir(parents=True)
    return str(tmp_path / "images")


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda tmp_path: MetaDataModule(Sinusoid(), ways=3),
            r"data\.ways=3 has no effect: Sinusoid tasks are regression",
        ),
        (
            lambda tmp_path: MetaDataModule(Sinusoid(), loading=Loading(num_workers=2)),
            r"data\.loading\.num_workers=2 has no effect on training: the tensor sampler",
        ),
        (
            lambda tmp_path: MetaDataModule(Omniglot(), loading=Loading("tensor", num_workers=2)),
            r"data\.loading\.num_workers=2 has no effect on training",
        ),
        (
            lambda tmp_path: MetaDataModule(Sinusoid(), root=str(tmp_path)),
            r"data\.root=.* has no effect: the Sinusoid needs no files",
        ),
        (
            lambda tmp_path: MetaDataModule(
                ImageFolder(image_folder_with_splits(tmp_path)), root=str(tmp_path)
            ),
            r"data\.root=.* has no effect: ImageFolder reads data\.dataset\.path",
        ),
        (
            lambda tmp_path: MetaDataModule(ImageFolder(image_folder_with_splits(tmp_path), split_seed=3)),
            r"data\.dataset\.split_seed=3 has no effect: .* has its own split folders",
        ),
        (
            lambda tmp_path: MetaDataModule(
                ImageFolder(image_folder_with_splits(tmp_path), split_fractions=(0.5, 0.25, 0.25))
            ),
            r"data\.dataset\.split_fractions=\(0\.5, 0\.25, 0\.25\) has no effect",
        ),
        (
            lambda tmp_path: MetaDataModule(
                TorchmetaDataset(
                    "torchmeta.toy.Harmonic", task_type="regression", input_shape=[1], image_size=28
                )
            ),
            r"data\.dataset\.image_size=28 has no effect: images are resized for classification datasets only",
        ),
    ],
    ids=[
        "ways-sinusoid",
        "num_workers-sinusoid",
        "num_workers-tensor",
        "root-sinusoid",
        "root-imagefolder",
        "split_seed",
        "split_fractions",
        "image_size-regression",
    ],
)
def test_data_setting_without_effect_warns(make, pattern, tmp_path):
    with expect_one(pattern) as record:
        make(tmp_path)
    messages = ignored_warnings(record)
    assert len(messages) == 1 and "\n" not in messages[0], messages


def test_data_settings_with_effect_do_not_warn(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        MetaDataModule(Sinusoid(), ways=1)  # what configs/sinusoid.yaml says
        MetaDataModule(Omniglot(), loading=Loading("torchmeta", num_workers=2), root=str(tmp_path))
        MetaDataModule(ImageFolder(str(tmp_path), split_seed=3))  # no split folders: the seed splits
    assert ignored_warnings(record) == []


def run_config(per_task_csv=None, second_order_from_step=None) -> Namespace:
    """The parts of a CLI config that warn_ignored_run_settings reads."""
    return Namespace(
        model=Namespace(inner_loop=Namespace(second_order_from_step=second_order_from_step)),
        per_task_csv=Namespace(path=per_task_csv),
        trainer=Namespace(max_steps=100),
    )


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_per_task_csv_outside_test_warns(subcommand):
    with expect_one(rf"per_task_csv\.path='tasks\.csv' has no effect: only `test` .* this is `{subcommand}`"):
        warn_ignored_run_settings(subcommand, run_config(per_task_csv="tasks.csv"))


def test_second_order_from_step_past_max_steps_warns():
    with expect_one(
        r"model\.inner_loop\.second_order_from_step=100 has no effect: the fit ends at trainer\.max_steps=100"
    ):
        warn_ignored_run_settings("fit", run_config(second_order_from_step=100))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_ignored_run_settings("fit", run_config(second_order_from_step=99))
        warn_ignored_run_settings("test", run_config(per_task_csv="tasks.csv"))
    assert ignored_warnings(record) == []


def test_cli_warns_before_running(tmp_path, monkeypatch):
    """The CLI checks the command's settings: per_task_csv given to a fit writes nothing, and says so."""
    monkeypatch.chdir(tmp_path)
    with expect_one(r"per_task_csv\.path='tasks\.csv' has no effect: only `test`"):
        main(
            [
                "fit",
                "--config",
                config("sinusoid.yaml"),
                "--per_task_csv.path=tasks.csv",
                "--trainer.fast_dev_run=true",
                "--model.execution.strategy=loop",
                *TINY,
            ]
        )
    assert not (tmp_path / "tasks.csv").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")))
def test_shipped_configs_warn_of_nothing(path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = MAMLCLI(MAML, MetaDataModule, run=False, args=["--config", path])
        warn_ignored_run_settings("fit", cli.config)
        warn_ignored_run_settings("test", cli.config)
    assert ignored_warnings(record) == []


def test_defaults_warn_of_nothing():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        maml()
        MetaDataModule(Sinusoid())
        MetaDataModule(Omniglot())
    assert ignored_warnings(record) == []
