"""A checkpoint written before a setting existed resumes: the run knew only that setting's default."""

from fmaml import runs


def everything(key: str) -> bool:
    return True


def test_a_setting_the_run_predates_is_not_a_conflict():
    run = {"model.network.class_path": "fmaml.models.ConvNet", "model.network.init_args.filters": 64}
    command = run | {"model.network.init_args.head_input": "flatten", "model.meta_objective.clip_value": None}
    assert runs.differences(command, run, everything) == []


def test_a_value_stored_above_a_new_key_still_differs():
    """The run had no scheduler at all (`null`); the command adds one: that changes training."""
    run = {"model.lr_scheduler": None, "model.inner_loop.optimizer.init_args.lr": 0.4}
    command = {
        "model.lr_scheduler.class_path": "torch.optim.lr_scheduler.StepLR",
        "model.inner_loop.optimizer.init_args.lr": 0.4,
    }
    assert runs.differences(command, run, everything) == [
        ("model.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR", None)
    ]


def test_a_changed_setting_the_run_stores_is_still_a_conflict():
    run = {"model.inner_loop.optimizer.init_args.lr": 0.4, "model.network.init_args.filters": 64}
    command = {"model.inner_loop.optimizer.init_args.lr": 0.1, "model.network.init_args.filters": 64}
    assert runs.differences(command, run, everything) == [
        ("model.inner_loop.optimizer.init_args.lr", 0.1, 0.4)
    ]


LEARN_LR = "model.inner_loop.optimizer.init_args.learn_lr"
TORCH_SGD = {
    "model.inner_loop.optimizer.class_path": "torch.optim.SGD",
    "model.inner_loop.optimizer.init_args.lr": 0.4,
}
FMAML_SGD = TORCH_SGD | {"model.inner_loop.optimizer.class_path": "fmaml.inner_optimizers.SGD"}


def test_learned_inner_rates_are_part_of_the_network():
    """The learned rates are tensors of the checkpoint: an evaluation may change the inner optimizer's class
    and rate, not whether (or how) its rate is learned."""
    assert runs.defines_network(LEARN_LR)
    assert not runs.defines_network("model.inner_loop.optimizer.init_args.lr")
    assert not runs.defines_network("model.inner_loop.optimizer.class_path")
    learned = FMAML_SGD | {LEARN_LR: "per_parameter"}
    assert runs.differences(TORCH_SGD, learned, runs.defines_network) == [(LEARN_LR, "off", "per_parameter")]
    lslr = learned | {LEARN_LR: "per_layer_per_step"}
    assert runs.differences(lslr, learned, runs.defines_network) == [
        (LEARN_LR, "per_layer_per_step", "per_parameter")
    ]
    assert (
        runs.differences(
            TORCH_SGD | {"model.inner_loop.optimizer.init_args.lr": 0.1}, TORCH_SGD, runs.defines_network
        )
        == []
    )


def test_no_learned_rates_is_the_same_network_whichever_class_says_so():
    assert runs.differences(TORCH_SGD, FMAML_SGD | {LEARN_LR: "off"}, runs.defines_network) == []
