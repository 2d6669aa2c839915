"""A checkpoint written before a setting existed resumes: the run knew only that setting's default."""

from fmaml import runs


def everything(key: str) -> bool:
    return True


def test_a_setting_the_run_predates_is_not_a_conflict():
    run = {"model.network.class_path": "fmaml.models.ConvNet", "model.network.init_args.filters": 64}
    command = run | {"model.network.init_args.head_input": "flatten", "model.meta_grad_clip_value": None}
    assert runs.differences(command, run, everything) == []


def test_a_value_stored_above_a_new_key_still_differs():
    """The run had no scheduler at all (`null`); the command adds one: that changes training."""
    run = {"model.lr_scheduler": None, "model.inner_lr": 0.4}
    command = {"model.lr_scheduler.class_path": "torch.optim.lr_scheduler.StepLR", "model.inner_lr": 0.4}
    assert runs.differences(command, run, everything) == [
        ("model.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR", None)
    ]


def test_a_changed_setting_the_run_stores_is_still_a_conflict():
    run = {"model.inner_lr": 0.4, "model.network.init_args.filters": 64}
    command = {"model.inner_lr": 0.1, "model.network.init_args.filters": 64}
    assert runs.differences(command, run, everything) == [("model.inner_lr", 0.1, 0.4)]
