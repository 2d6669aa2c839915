"""The networks of the MAML paper, as plain nn.Modules (any nn.Module works with the engine).

The first positional argument of each is its number of outputs, so that a config can give the rest
(`network: {class_path: fmaml.models.ConvNet, init_args: {filters: 32}}`) while the data decides the
outputs (the number of ways).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from fmaml.per_step_batch_norm import PerStepBatchNorm2d

BATCH_NORM = "model.network.init_args.batch_norm"


@dataclass(frozen=True)
class BatchNormSettings:
    """ConvNet's BatchNorm layers: MAML's (the default), or MAML++'s per-step BatchNorm.

    per_step: MAML++'s BNWB, 0 (default) for MAML's BatchNorm, which normalises with batch statistics
        at training and test time alike. N >= 1: each BatchNorm layer has a weight and bias per inner
        step, [N, C], inner step i using row min(i, N - 1) (N = the training inner steps in MAML++); the
        network is then called as network(x, inner_step=i), which fmaml.maml does for a network with
        `takes_inner_step`.
    running_stats: MAML++'s BNRS (needs per_step): running statistics per inner step, used in eval mode
        (validation, test), updated by fmaml.per_step_batch_norm after each training meta-step. See that
        module for how they differ from MAML++'s code.
    """

    per_step: int = 0
    running_stats: bool = False

    def __post_init__(self) -> None:
        steps, running_stats = self.per_step, self.running_stats
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"{BATCH_NORM}.per_step={steps!r}: give the number of inner steps with their own BatchNorm "
                "weight and bias, an integer >= 0 (0: one for all steps, MAML's; MAML++: model.inner_loop.steps)"
            )
        if running_stats and not steps:
            raise ValueError(
                f"{BATCH_NORM}.running_stats={running_stats!r} needs per-step BatchNorm: set "
                f"{BATCH_NORM}.per_step to the inner steps (e.g. model.inner_loop.steps), or drop running_stats"
            )


MAML_BATCH_NORM = BatchNormSettings()


def _conv_block(
    in_channels: int, filters: int, pooling: Literal["max", "stride"], batch_norm: BatchNormSettings
) -> nn.Sequential:
    # BatchNorm uses batch statistics at train and test time alike, as in MAML; tracking running stats
    # would be state updated in place during adaptation, which neither the math nor vmap allows. MAML++'s
    # per-step BatchNorm keeps its running statistics as state updated outside the forward instead.
    stride = 2 if pooling == "stride" else 1
    norm = (
        PerStepBatchNorm2d(filters, batch_norm.per_step, batch_norm.running_stats)
        if batch_norm.per_step
        else nn.BatchNorm2d(filters, track_running_stats=False)
    )
    layers = [nn.Conv2d(in_channels, filters, kernel_size=3, stride=stride, padding=1), norm, nn.ReLU()]
    if pooling == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


HEAD_INPUTS = ("flatten", "mean")
INITS = ("pytorch", "reference")


class ConvNet(nn.Module):
    """The MAML 4-block CNN: 4 x [conv3x3, BatchNorm, ReLU, max-pool or stride 2], then a linear head.

    Input [batch, in_channels, image_size, image_size] -> logits [batch, ways].
    The paper uses 64 filters with stride 2 on Omniglot (28x28) and 32 filters with max-pool on
    MiniImageNet (84x84).

    head_input: what the linear head sees of the last block's features [batch, filters, s, s] (s = 2 on
        Omniglot 28x28 with stride 2, 5 on MiniImageNet 84x84 with max-pool):
        "flatten" (default): all of them, [batch, filters * s * s] (Omniglot: 64 * 2 * 2 = 256 inputs);
        "mean": their mean over the s x s positions, [batch, filters] (64 inputs). The reference code
        (cbfinn/maml, maml.py `forward_conv`) averages for Omniglot (`tf.reduce_mean(hidden4, [1, 2])`)
        and flattens for MiniImageNet.
    init: "pytorch" (default): PyTorch's default initialisation. "reference": the reference code's
        (maml.py `construct_conv_weights`): Xavier-uniform convolutions, zero biases, and a head drawn from
        N(0, 1) with head_input="mean" (its Omniglot head, tf.random_normal) or Xavier-uniform with
        "flatten" (its MiniImageNet head). BatchNorm starts at offset 0, scale 1 either way.
    batch_norm: MAML's BatchNorm (the default) or MAML++'s per step, `BatchNormSettings`
        (`batch_norm: {per_step: 5, running_stats: false}`).
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        pooling: Literal["max", "stride"] = "stride",
        head_input: Literal["flatten", "mean"] = "flatten",
        init: Literal["pytorch", "reference"] = "pytorch",
        batch_norm: BatchNormSettings = MAML_BATCH_NORM,
    ):
        super().__init__()
        for name, value in (("ways", ways), ("in_channels", in_channels), ("filters", filters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvNet {name}={value!r} must be an integer >= 1")
        if pooling not in ("max", "stride"):
            raise ValueError(f"ConvNet pooling={pooling!r} must be 'max' or 'stride'")
        if head_input not in HEAD_INPUTS:
            raise ValueError(
                f"model.network.init_args.head_input={head_input!r} is unknown: use flatten (every feature "
                "position, the default) or mean (the average over positions, the reference's Omniglot head)"
            )
        if init not in INITS:
            raise ValueError(
                f"model.network.init_args.init={init!r} is unknown: use pytorch (PyTorch's default, the "
                "default) or reference (the MAML reference code's)"
            )
        size = image_size
        for _ in range(4):  # both conv stride 2 (padding 1) and max-pool 2 map n -> ceil(n/2) or floor(n/2)
            size = (size + 1) // 2 if pooling == "stride" else size // 2
        if size < 1:
            raise ValueError(f"ConvNet image_size={image_size} is too small for 4 halvings: use >= 16")
        self.features = nn.Sequential(
            *(_conv_block(in_channels if i == 0 else filters, filters, pooling, batch_norm) for i in range(4))
        )
        self.takes_inner_step = batch_norm.per_step > 0
        self.head_input = head_input
        self.head = nn.Linear(filters * (1 if head_input == "mean" else size * size), ways)
        self.input_shape = (in_channels, image_size, image_size)  # checked against the data by the CLI
        if init == "reference":
            self._reference_init()

    def _reference_init(self) -> None:
        for block in self.features:
            nn.init.xavier_uniform_(block[0].weight)
            nn.init.zeros_(block[0].bias)
        if self.head_input == "mean":
            nn.init.normal_(self.head.weight)
        else:
            nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, inner_step: int = 0) -> Tensor:
        features = self._per_step_features(x, inner_step) if self.takes_inner_step else self.features(x)
        if self.head_input == "mean":
            return self.head(features.mean(dim=(2, 3)))
        return self.head(features.flatten(1))

    def _per_step_features(self, x: Tensor, inner_step: int) -> Tensor:
        for layer in (layer for block in self.features for layer in block):
            x = layer(x, inner_step) if isinstance(layer, PerStepBatchNorm2d) else layer(x)
        return x


class MLP(nn.Module):
    """The sinusoid regressor of the paper: in -> 40 -> 40 -> out, with ReLU.

    Input [batch, in_features] -> [batch, outputs].
    """

    def __init__(self, outputs: int = 1, in_features: int = 1, hidden: tuple[int, ...] = (40, 40)):
        super().__init__()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))
        self.input_shape = (in_features,)  # checked against the data by the CLI

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
