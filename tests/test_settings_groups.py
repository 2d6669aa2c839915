"""Issue 23: MAML takes a few grouped settings (fmaml.settings), configured as nested keys, each checking
its own values; checkpoints written before the groups still resume, evaluate and load."""

import ast
import glob
import inspect
import os

import pytest
import torch
from fixtures import TINY, config, error_lines

from fmaml.cli import command_line, main
from fmaml.models import MLP
from fmaml.module import MAML
from fmaml.settings import Execution, InnerLoop, MetaObjective, grouped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written by `fit --config configs/sinusoid.yaml --model.inner_steps=2 --model.strategy=vmap
# --model.meta_grad_clip_norm=10.0 --trainer.max_steps=3 --data.meta_batch_size=4` at 502bf95, the
# last commit before the groups: its hyperparameters and stored config use the flat names.
OLD_CKPT = os.path.join(os.path.dirname(__file__), "data", "sinusoid_502bf95.ckpt")
# Today's spelling of that run's settings.
OLD_RUN = [
    "--model.inner_loop.steps=2",
    "--model.execution.strategy=vmap",
    "--model.meta_objective.clip_norm=10.0",
    "--data.meta_batch_size=4",
]


def test_maml_takes_at_most_eight_parameters():
    parameters = list(inspect.signature(MAML.__init__).parameters)[1:]
    assert parameters == [
        "network", "num_outputs", "loss", "inner_loop", "meta_objective", "execution", "optimizer",
        "lr_scheduler",
    ]  # fmt: skip


def test_no_fmaml_class_takes_over_eight_parameters():
    """Settings that belong together travel as one small typed object (fmaml.settings, ConvNet's
    BatchNormSettings, the data's EvaluationTasks and Loading), not as a long flat signature."""
    over = {}
    for path in glob.glob(os.path.join(REPO, "fmaml", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        a = item.args
                        count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1 + bool(a.vararg)
                        if count > 8:
                            over[node.name] = count
    assert over == {}, over


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: InnerLoop(steps=0), r"model\.inner_loop\.steps=0: the number of inner steps"),
        (lambda: InnerLoop(eval_lr=-1.0), r"model\.inner_loop\.eval_lr=-1\.0"),
        (lambda: InnerLoop(adapt_only="head"), r"model\.inner_loop\.adapt_only='head': give a list"),
        (
            lambda: InnerLoop(first_order=True, second_order_from_step=5),
            r"model\.inner_loop\.second_order_from_step=5 .* set first_order: false",
        ),
        (lambda: MetaObjective(msl_anneal_steps=0), r"model\.meta_objective\.msl_anneal_steps=0"),
        (lambda: MetaObjective(clip_norm=-1.0), r"model\.meta_objective\.clip_norm=-1\.0: .* positive"),
        (lambda: Execution(strategy="fast"), r"model\.execution\.strategy='fast' is unknown"),
        (lambda: Execution(memory="some"), r"model\.execution\.memory='some' is unknown"),
        (lambda: Execution(auto_memory_share=2), r"model\.execution\.auto_memory_share=2: .* \(0, 1\]"),
        (
            lambda: Execution(compile=True),
            r"model\.execution\.compile=true with model\.execution\.strategy=auto",
        ),
    ],
)
def test_each_group_refuses_its_bad_values_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_rule_across_groups_is_checked_by_the_module():
    with pytest.raises(ValueError, match=r"model\.execution\.memory=recompute does not support adapt_only"):
        MAML(MLP, num_outputs=1, loss="mse", inner_loop=InnerLoop(adapt_only=["layers.4"]), execution=Execution(memory="recompute"))  # fmt: skip


def test_grouped_builds_the_groups_from_flat_names():
    kwargs = grouped(
        inner_steps=3, eval_inner_lr=0.2, strategy="loop", meta_grad_clip_value=1.0, num_outputs=1
    )
    assert kwargs == {
        "num_outputs": 1,
        "inner_loop": InnerLoop(steps=3, eval_lr=0.2),
        "execution": Execution(strategy="loop"),
        "meta_objective": MetaObjective(clip_value=1.0),
    }


def test_nested_keys_configure_the_groups_from_the_command_line(in_tmp):
    cli = main(
        [
            "fit", "--config", config("sinusoid.yaml"), *TINY, "--trainer.max_steps=2",
            "--trainer.val_check_interval=2", "--model.inner_loop.steps=3", "--model.execution.strategy=loop",
            "--model.meta_objective.clip_value=0.5", "--model.inner_loop.optimizer.lr=0.02",
        ]
    )  # fmt: skip
    model = cli.model
    assert model.inner_loop.steps == 3 and model.train_inner["steps"] == 3
    assert model.inner_loop.optimizer.lr == 0.02 and model.train_inner["lr"] == 0.02
    assert model.strategy_choice.current(model) == {"strategy": "loop"}
    assert model.meta_objective.clip_value == 0.5
    assert model.inner_loop.eval_steps == 10  # the config's, untouched


@pytest.mark.parametrize(
    "old, new",
    [
        ("model.inner_steps=2", "model.inner_loop.steps"),
        ("data.num_test_tasks=50", "data.evaluation.num_test_tasks"),
        ("data.seed=1", "data.evaluation.seed"),
        ("data.sampler=torchmeta", "data.loading.sampler"),
        ("data.num_workers=2", "data.loading.num_workers"),
        # a setting inside the network's class_path object, which jsonargparse reports differently
        ("model.network.init_args.per_step_batch_norm=5", "model.network.init_args.batch_norm.per_step"),
        (
            "model.network.init_args.per_step_running_stats=true",
            "model.network.init_args.batch_norm.running_stats",
        ),
    ],
)
def test_an_old_flat_key_is_refused_naming_its_new_place(old, new, in_tmp, capsys):
    assert command_line(["fit", "--config", config("omniglot.yaml"), f"--{old}"]) == 2
    line, hint = error_lines(capsys)
    key = old.split("=")[0]
    assert hint == f"({key} is now {new})", (line, hint)
    assert line.startswith("error: ") and key.split(".")[-1] in line, line  # one line, naming it


def test_a_checkpoint_from_before_the_groups_evaluates_and_resumes(in_tmp, capsys):
    checkpoint = torch.load(OLD_CKPT, weights_only=False)
    assert checkpoint["hyper_parameters"]["inner_steps"] == 2  # the flat names, indeed
    run = ["--config", config("sinusoid.yaml"), *TINY, *OLD_RUN]
    tested = main(["test", *run, f"--ckpt_path={OLD_CKPT}"])
    for name, tensor in tested.model.network.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][f"network.{name}"])
    # A resume must keep what defines training: today's names of the run's settings are equal to it...
    resumed = main(["fit", *run, "--trainer.max_steps=4", f"--ckpt_path={OLD_CKPT}"])
    assert resumed.trainer.global_step == 4
    # ...and a change is refused, by today's name.
    assert command_line(["fit", *run, "--model.inner_loop.steps=3", f"--ckpt_path={OLD_CKPT}"]) == 1
    line, setting = error_lines(capsys)
    assert line.endswith("in what defines training (network, inner loop, optimizer, scheduler, tasks):"), line
    assert setting == "  model.inner_loop.steps: 3 here, 2 in the run", setting
    # The run's data settings are compared under today's names too: its fixed evaluation tasks may change
    # (TINY's are not the run's), its sampler may not.
    assert command_line(["fit", *run, "--data.loading.sampler=torchmeta", f"--ckpt_path={OLD_CKPT}"]) == 1
    assert error_lines(capsys)[1] == "  data.loading.sampler: 'torchmeta' here, 'auto' in the run"


def test_load_from_checkpoint_reads_an_old_checkpoints_flat_settings():
    module = MAML.load_from_checkpoint(OLD_CKPT, network=lambda outputs: MLP(outputs, hidden=(40, 40)))
    assert module.inner_loop.steps == 2 and module.inner_loop.eval_steps == 10
    assert module.execution.strategy == "vmap" and module.meta_objective.clip_norm == 10.0
    state = torch.load(OLD_CKPT, weights_only=False)["state_dict"]
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
