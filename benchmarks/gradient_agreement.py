"""The largest relative error of fmaml's meta-gradient against `higher`, per strategy, in float64.

    uv run python benchmarks/gradient_agreement.py --json benchmarks/results/gradient_agreement.json

Covers what tests/test_maml_engine.py asserts (ConvNet with BatchNorm and the sinusoid MLP; 1 and 3 inner
steps; first and second order), prints the worst case of each strategy and writes it to --json (the
figures the READMEs quote, checked against this file by tests/test_readme_figures.py).
"""

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_maml_engine import (  # noqa: E402
    STRATEGIES,
    _conv_case,
    _mlp_case,
    fmaml_meta_gradient,
    higher_meta_gradient,
    relative_error,
)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--json", help="write {strategy: largest relative error} here")
args = parser.parse_args()
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
if args.json:
    with open(args.json, "w") as f:
        json.dump(
            {"largest_relative_error_vs_higher_float64": worst, "torch": torch.__version__}, f, indent=1
        )
