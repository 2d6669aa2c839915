"""The largest relative error of fmaml's meta-gradient against `higher`, per strategy, in float64.

    uv run python benchmarks/gradient_agreement.py

Covers what tests/test_maml_engine.py asserts (ConvNet with BatchNorm and the sinusoid MLP; 1 and 3 inner
steps; first and second order) and prints the worst case of each strategy.
"""

import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_maml_engine import (  # noqa: E402
    STRATEGIES,
    _conv_case,
    _mlp_case,
    fmaml_meta_gradient,
    higher_meta_gradient,
    relative_error,
)

worst = dict.fromkeys(STRATEGIES, 0.0)
for case, steps, first_order in itertools.product((_conv_case, _mlp_case), (1, 3), (False, True)):
    model, tasks, loss = case()
    lr = 0.4 if loss == "cross_entropy" else 0.01
    reference = higher_meta_gradient(model, tasks, loss, steps, lr, first_order)
    for strategy in STRATEGIES:
        grads, _, _ = fmaml_meta_gradient(model, tasks, loss, steps, lr, first_order, strategy)
        worst[strategy] = max(worst[strategy], relative_error(grads, reference))
print("| strategy | largest relative error vs higher (float64) |\n| --- | --- |")
for strategy, error in worst.items():
    print(f"| {strategy} | {error:.1e} |")
