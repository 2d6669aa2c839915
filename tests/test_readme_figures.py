"""Every README figure this file knows about equals the results file a benchmark script wrote.

Pure file reads: each check finds a figure on the page that shows it (README.md, benchmarks/README.md or
configs/README.md), by its table row or by the words around it, and compares the text shown with the value
in `benchmarks/results/` formatted as the page shows it. Ratios and paired differences are computed from the
files, never copied. A README edit that moves a figure out of its sentence, or to another page, fails here
too ("not found"): update the check with the text.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FRONT = ROOT / "README.md"
BENCH = ROOT / "benchmarks" / "README.md"
CONFIGS = ROOT / "configs" / "README.md"
PACKAGE = ROOT / "fmaml" / "README.md"
TESTS = ROOT / "tests" / "README.md"
READMES = (FRONT, BENCH, CONFIGS, PACKAGE, TESTS)
MINUS = "\u2212"  # the READMEs print negative differences with a typographic minus


# ------------------------------------------------------------------------------------------ reading


def _name(readme: Path) -> str:
    return str(readme.relative_to(ROOT))


def _json(name: str):
    return json.loads((RESULTS / name).read_text())


def _column(path: Path, name: str) -> list[float]:
    with open(path) as f:
        return [float(row[name]) for row in csv.DictReader(f)]


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (1.96 standard errors), as `fmaml test` and the benchmark scripts compute."""
    n, mean = len(values), sum(values) / len(values)
    return mean, 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _table(readme: Path, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with `header`, cells stripped of bold."""
    lines = readme.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{_name(readme)}: expected one table headed {header!r}, found {len(starts)}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")])
    return rows


def _row(rows: list[list[str]], first_cell_prefix: str) -> list[str]:
    found = [row for row in rows if row[0].startswith(first_cell_prefix)]
    assert len(found) == 1, f"expected one row starting {first_cell_prefix!r}, found {len(found)}"
    return found[0]


def _shown(readme: Path, template: str) -> tuple[str, ...]:
    """The figures at the `{}` places of `template` (the literal words around them) in the README; line
    breaks and runs of spaces count as one space, so re-wrapping a paragraph does not matter."""
    # A figure: up to four words ("94.66 ± 0.54 %"), never across a parenthesis.
    pattern = re.escape(" ".join(template.split())).replace(re.escape("{}"), r"([^()\s]+(?: [^()\s]+){0,3}?)")
    found = re.findall(pattern, " ".join(readme.read_text().split()))
    assert len(found) == 1, (
        f"{_name(readme)}: expected the text {template!r} once, found it {len(found)} times"
    )
    if "{}" not in template:  # a claim checked elsewhere against the file: only its presence here
        return ()
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def _expect(readme: Path, template: str, *expected: str) -> None:
    assert _shown(readme, template) == expected, f"{_name(readme)}: {template!r}"


# ------------------------------------------------------------------------------------------ formats


def _thousands(value: float) -> str:
    return f"{value:,.0f}"


def _pct_ci(mean_ci: tuple[float, float] | list[float]) -> str:
    return f"{100 * mean_ci[0]:.2f} ± {100 * mean_ci[1]:.2f} %"


def _signed_points(mean_ci: tuple[float, float] | list[float]) -> str:
    sign = "+" if mean_ci[0] >= 0 else MINUS
    return f"{sign}{100 * abs(mean_ci[0]):.2f} ± {100 * mean_ci[1]:.2f}"


def _ms(value: float) -> str:
    """One decimal under 100 ms, whole milliseconds (with thousands separators) above."""
    return f"{value:.1f}" if value < 100 else _thousands(value)


def _ratio(value: float, whole_from: float = math.inf) -> str:
    """Two decimals under 2x, where they matter; one above; none from `whole_from` on."""
    return f"{value:.0f}x" if value >= whole_from else f"{value:.2f}x" if value < 2 else f"{value:.1f}x"


# ------------------------------------------------------------------------------------------ the paper table


def _paper_rows() -> dict:
    return _json("paper_table.json")["rows"]


def _mse(test: dict) -> str:
    return f"{test['mean']:.3f} ± {test['ci95']:.3f}"


PAPER_OMNIGLOT = 98.7  # the MAML paper's 5-way 1-shot accuracy, %
PAPER_SINUSOID_K10 = (0.67, 0.38, 0.35)  # its K=10 MSEs after 1, 5 and 10 steps, as the README quotes them


def test_paper_table_sinusoid_rows_equal_paper_table_json():
    rows = _table(FRONT, "| setting | split | fmaml")
    for k in (5, 10, 20):
        result = _paper_rows()[f"sinusoid_K{k}"]
        row = _row(rows, f"sinusoid, K={k},")
        shown = " / ".join(_mse(result["tests"][f"steps={s}"]) for s in (1, 5, 10))
        assert row[2] == shown, f"sinusoid K={k}"
        minutes = result["fit_wall_seconds"] / 60
        assert row[4] == f"{_thousands(result['steps'])} steps, {minutes:.1f} min", f"sinusoid K={k}"
    k10 = _paper_rows()["sinusoid_K10"]["tests"]
    assert _row(rows, "sinusoid, K=10,")[3] == " / ".join(map(str, PAPER_SINUSOID_K10))
    lower = all(
        k10[f"steps={s}"]["mean"] < paper for s, paper in zip((1, 5, 10), PAPER_SINUSOID_K10, strict=True)
    )
    assert lower, "benchmarks/README.md says the K=10 MSEs are lower than the paper's at every step count"
    _expect(BENCH, "the sinusoid's MSEs at K=10 are lower than the paper's at every step count.")


def test_paper_table_main_command_row_equals_paper_table_json():
    """The row for the default, configs/omniglot.yaml (5-way 5-shot) trained for 30 minutes."""
    result = _paper_rows()["omniglot_5w5s_main"]
    row = _row(_table(FRONT, "| setting | split | fmaml"), "Omniglot 5-way 5-shot, the main command")
    test = result["tests"]["steps=3"]
    assert row[2] == _pct_ci((test["mean"], test["ci95"]))
    minutes, per_step = result["train_seconds"] / 60, result["train_seconds"] / result["steps"]
    assert (
        row[4]
        == f"{_thousands(result['steps'])} steps in {minutes:.0f} min of training, {per_step:.2f} s/step"
    )
    assert "--training_time.budget_minutes=30" in result["fit_command"]
    assert "--config configs/omniglot.yaml --data.dataset.init_args.split=paper" in result["fit_command"]


def test_paper_table_omniglot_rows_equal_paper_table_json():
    rows = _table(FRONT, "| setting | split | fmaml")
    result = _paper_rows()["omniglot_5w1s_paper"]
    one, fifteen = (result["tests"][f"query_shots={q}"] for q in (1, 15))
    row = _row(rows, "Omniglot 5-way 1-shot")
    assert row[2] == _pct_ci((one["mean"], one["ci95"]))
    minutes = result["fit_wall_seconds"] / 60
    assert row[4] == f"{_thousands(result['steps'])} steps, {minutes:.0f} min"
    assert _row(rows, "same checkpoint, 15 query")[2] == _pct_ci((fifteen["mean"], fifteen["ci95"]))
    steps = _thousands(result["steps"])
    share, short = f"{100 * result['steps'] / 60000:.1f}%", f"{PAPER_OMNIGLOT - 100 * one['mean']:.1f}"
    _expect(
        BENCH,
        "Omniglot model had {} of the paper's 60,000 meta-steps ({}), and is {} points short",
        steps,
        share,
        short,
    )
    _expect(FRONT, "The Omniglot row trained a fixed {} steps", steps)
    per_step = f"{result['fit_wall_seconds'] / result['steps']:.1f}"
    _expect(
        BENCH,
        "The Omniglot row trained a fixed {} steps, not the 2,000 planned, because at the {} s",
        steps,
        per_step,
    )


# ------------------------------------------------------------------------------------------ recipes


RECIPE_ROWS = {
    "maml": "MAML (`omniglot_5w1s.yaml`",
    "fomaml": "first-order MAML",
    "mamlpp": "MAML++",
    "metasgd": "Meta-SGD",
    "anil": "ANIL",
    "maml_20w1s": "MAML, 20-way",
    "imaml": "iMAML",
    "reptile": "Reptile",
}


def test_recipe_table_equals_recipes_results_json():
    results = _json("recipes_5w1s/results.json")
    rows = _table(BENCH, "| recipe (config) |")
    for recipe, prefix in RECIPE_ROWS.items():
        _assert_recipe_row(_row(rows, prefix), results[recipe], recipe)


def _assert_recipe_row(row: list[str], r: dict, recipe: str) -> None:
    """A recipe table row: accuracies after 3 and 5 steps (or the recipe's own eval steps, marked), the
    paired difference from MAML after 3 and 5, steps, s/step."""
    steps = r.get("eval_steps", (3, 5))
    own = [f" ({k} steps)" if k != column else "" for k, column in zip(steps, (3, 5), strict=True)]
    assert row[1:3] == [_pct_ci(r[f"test{k}"]) + mark for k, mark in zip(steps, own, strict=True)], recipe
    if f"minus_maml{steps[0]}" in r:
        paired = [_signed_points(r[f"minus_maml{k}"]) for k in steps]
        assert row[3] == " / ".join(paired), recipe
    assert row[4:6] == [_thousands(r["steps"]), f"{r['seconds_per_step']:.2f}"], recipe


def test_recipe_discussion_equals_recipes_results_json():
    r = _json("recipes_5w1s/results.json")
    maml, anil, fomaml, mamlpp = r["maml"], r["anil"], r["fomaml"], r["mamlpp"]
    more_steps = f"{100 * (anil['steps'] / maml['steps'] - 1):.0f}%"
    _expect(
        BENCH,
        "it fits {} more meta-steps ({} against {})",
        more_steps,
        *map(_thousands, (anil["steps"], maml["steps"])),
    )
    _expect(BENCH, "accurate ({} points over MAML", f"+{100 * anil['minus_maml3'][0]:.1f}")
    _expect(
        BENCH,
        "Meta-SGD comes next ({})",
        f"+{100 * r['metasgd']['minus_maml3'][0]:.1f} ± {100 * r['metasgd']['minus_maml3'][1]:.1f}",
    )
    _expect(
        BENCH,
        "its {} s against {} s",
        f"{r['metasgd']['seconds_per_step']:.2f}",
        f"{maml['seconds_per_step']:.2f}",
    )
    cheaper = f"{100 * (1 - fomaml['seconds_per_step'] / maml['seconds_per_step']):.0f}%"
    _expect(
        BENCH,
        "First-order MAML is {} cheaper per step but {} points behind",
        cheaper,
        f"{-100 * fomaml['minus_maml3'][0]:.0f}",
    )
    ratio = f"{mamlpp['seconds_per_step'] / maml['seconds_per_step']:.1f}x"
    _expect(
        BENCH,
        "MAML++ is {} points behind because its 5 inner steps make a step {} MAML's ({} steps)",
        f"{-100 * mamlpp['minus_maml3'][0]:.0f}",
        ratio,
        _thousands(mamlpp["steps"]),
    )
    _expect(
        BENCH,
        "(MAML {} s, Meta-SGD {} s)",
        f"{maml['seconds_per_step']:.2f}",
        f"{r['metasgd']['seconds_per_step']:.2f}",
    )
    twenty = r["maml_20w1s"]
    _expect(
        BENCH,
        "it had {} of the paper's 60,000 meta-steps ({})",
        _thousands(twenty["steps"]),
        f"{100 * twenty['steps'] / 60000:.2f}%",
    )
    _expect(BENCH, "20-way row is {} points short of the paper", f"{95.8 - 100 * twenty['test3'][0]:.0f}")
    _expect(BENCH, "MAML alone reached {} in its 20 minutes", _pct_ci(maml["test3"]))
    _expect(
        BENCH,
        "was rerun at {} steps, which it reached after {} s",
        _thousands(mamlpp["steps"]),
        _thousands(mamlpp["train_seconds"]),
    )


# ------------------------------------------------------------------------------------------ memory


def _memory(name: str) -> dict[tuple[str, int], dict]:
    return {(r["engine"], r["value"]): r for r in _json(name)}


def test_memory_steps_table_equals_memory_cpu_steps_json():
    records = _memory("memory_cpu_steps.json")
    for row in _table(BENCH, "| engine | 1 step |"):
        engine = row[0].replace(" + ", "+")
        growth = [records[(engine, s)]["growth_mb"] for s in (1, 5, 10, 20)]
        assert row[1:5] == [f"{_thousands(growth[0])} MB", *map(_thousands, growth[1:])], engine
        assert row[5] == _ratio(growth[3] / growth[0]), engine
        time5 = records[(engine, 5)]["median_ms"]
        assert row[6] == f"{_thousands(time5)} ms", engine
        if engine.endswith("+recompute"):
            store = records[(engine.removesuffix("+recompute"), 5)]["median_ms"]
            assert row[7] == f"{time5 / store:.2f}x", engine


def test_memory_batch_table_equals_memory_cpu_batch_json():
    records = _memory("memory_cpu_batch.json")
    for row in _table(BENCH, "| engine | mb 1 |"):
        growth = {mb: records[(row[0], mb)]["growth_mb"] for mb in (1, 2, 4, 8, 16, 32, 64)}
        shown = [f"{_thousands(growth[1])} MB", *(_thousands(growth[mb]) for mb in (2, 4, 8, 16, 32, 64))]
        assert row[1:8] == shown, row[0]
        for cell, ratio in zip(row[8:10], (growth[64] / growth[1], growth[32] / growth[2]), strict=True):
            assert cell == _ratio(ratio, whole_from=10), row[0]


def test_memory_prose_equals_memory_files():
    steps, batch = _memory("memory_cpu_steps.json"), _memory("memory_cpu_batch.json")
    vmap5 = {r["engine"]: r for r in _json("memory_cpu_vmap5.json")}

    def steps_ratio(engine):
        return f"{steps[(engine, 20)]['growth_mb'] / steps[(engine, 1)]['growth_mb']:.2f}x"

    def time_ratio(engine, inner_steps=5):
        return (
            steps[(engine + "+recompute", inner_steps)]["median_ms"]
            / steps[(engine, inner_steps)]["median_ms"]
        )

    loop_growth = f"{batch[('loop', 64)]['growth_mb'] / batch[('loop', 1)]['growth_mb']:.2f}x"
    _expect(BENCH, "The loop grows {} from 1 to 64 tasks", loop_growth)
    _expect(CONFIGS, "memory of one task, {} from 1 to 64 tasks)", loop_growth)
    chunk = [batch[("chunked:8", mb)]["growth_mb"] for mb in (8, 64)]
    _expect(
        BENCH,
        "`chunked:8` grows from {} to {} MB ({}) from 8 to 64 tasks",
        *map(_thousands, chunk),
        f"{chunk[1] / chunk[0]:.2f}x",
    )
    _expect(
        BENCH,
        "20 inner steps take {} (loop) and {} (vmap) the memory of 1 step",
        steps_ratio("loop+recompute"),
        steps_ratio("vmap+recompute"),
    )
    _expect(
        FRONT,
        "(20 steps in {} (loop) to {} (vmap) the memory of one",
        steps_ratio("loop+recompute"),
        steps_ratio("vmap+recompute"),
    )
    _expect(
        BENCH,
        "the memory of 1 step, against {} and {} without",
        *(_ratio(steps[(e, 20)]["growth_mb"] / steps[(e, 1)]["growth_mb"]) for e in ("loop", "vmap")),
    )
    store, recompute = vmap5["vmap"], vmap5["vmap+recompute"]
    _expect(
        BENCH,
        "`vmap` + recompute peaks at {} MB against {} MB for `vmap` ({})",
        _thousands(recompute["growth_mb"]),
        _thousands(store["growth_mb"]),
        f"{recompute['growth_mb'] / store['growth_mb']:.2f}x",
    )
    _expect(
        BENCH,
        "({} s against {} s per step",
        f"{recompute['median_ms'] / 1000:.1f}",
        f"{store['median_ms'] / 1000:.1f}",
    )
    prices = [f"{time_ratio(e):.2f}x" for e in ("loop", "vmap", "chunked:8")]
    _expect(BENCH, "in this run: {} the loop's time, {} vmap's, {} chunked:8's", *prices)
    _expect(
        CONFIGS,
        "for {} (vmap) to {} (chunked:8) the time at 5 steps ({} for the loop)",
        prices[1],
        prices[2],
        prices[0],
    )
    _expect(
        BENCH,
        "recompute costs {} at 5 steps and {} to {} at 10 to 20",
        f"{time_ratio('vmap'):.2f}x",
        *sorted(f"{time_ratio('vmap', s):.2f}x" for s in (10, 20)),
    )
    gb = [f"{steps[(e, 20)]['growth_mb'] / 1000:.1f} GB" for e in ("vmap", "vmap+recompute")]
    _expect(BENCH, "`vmap` at 20 inner steps and meta-batch 8 needs {} on this CPU; with recompute, {}.", *gb)
    _expect(CONFIGS, "(`vmap` at 20 steps: {} instead of {})", *gb[::-1])


def test_memory_soak_equals_memory_soak_json():
    rows = {r["step"]: r["rss_mb"] for r in _json("memory_soak_cpu.json")["rows"]}
    _expect(
        BENCH,
        "measured {} MB resident at step 1 and {} MB at step 100, and {} MB at step 2,000",
        *(f"{rows[s]:.0f}" for s in (1, 100, 2000)),
    )


# ------------------------------------------------------------------------------------------ precision


def _precision_row(row: dict) -> list[str]:
    """A row of the mixed-precision table; its time against float32 only where the run was timed."""
    error, cosine = f"{100 * row['relative_error']:.1f}%", f"{row['cosine']:.4f}"
    time = [_ratio(row["seconds"] / row["float32_seconds"])] if "seconds" in row else []
    return [row["strategy"], row["memory"], row["precision"], error, cosine, *time]


def _paired_runs(folder: str) -> tuple[str, str, str]:
    fp32, bf16 = (_column(RESULTS / folder / f"{n}_test.csv", "accuracy") for n in ("32_true", "bf16_mixed"))
    difference = _mean_ci([b - a for a, b in zip(fp32, bf16, strict=True)])
    return _pct_ci(_mean_ci(fp32)), _pct_ci(_mean_ci(bf16)), _signed_points(difference)


def test_mixed_precision_figures_equal_their_files():
    rows = _json("mixed_precision/gradient.json")["rows"]
    assert _table(BENCH, "| strategy | memory | precision |") == [_precision_row(r) for r in rows]
    (vmap,) = [r for r in rows if (r["strategy"], r["memory"], r["precision"]) == ("vmap", "store", "bf16")]
    _expect(
        CONFIGS, "Its meta-gradient is {} off float32's (cosine {}) under `vmap`", *_precision_row(vmap)[3:5]
    )
    fp32, bf16, difference = _paired_runs("mixed_precision_vmap")
    _expect(
        BENCH, "with `vmap`: float32 {}, bf16-mixed {}; paired difference {} points", fp32, bf16, difference
    )
    _expect(CONFIGS, "test at {} against {} in float32 (paired difference {} points)", bf16, fp32, difference)
    fp32, bf16, difference = _paired_runs("mixed_precision")
    _expect(
        BENCH,
        "the loop under autocast: float32 {}, bf16-mixed {}; paired difference {} points",
        fp32,
        bf16,
        difference,
    )


# ------------------------------------------------------------------------------------------ auto, higher, gradients


AUTO_WORKLOADS = {
    "sinusoid": "sinusoid",
    "Omniglot 5w5s": "omniglot5w5s",
    "Omniglot 20w1s": "omniglot20w1s",
    "MiniImageNet": "miniimagenet",
}


def test_auto_vs_fixed_table_and_prose_equal_auto_vs_fixed_json():
    records = {r["workload"]: r for r in _json("auto_vs_fixed_cpu.json")}
    for row in _table(BENCH, "| workload | auto chose |"):
        r = records[AUTO_WORKLOADS[row[0].split(",")[0]]]
        chosen, fastest = r["chosen"], r["fastest"]
        shown = [
            chosen.replace(" ", ", "),
            _ms(r["medians_ms"][chosen]),
            fastest.replace(" ", ", "),
            _ms(r["medians_ms"][fastest]),
        ]
        assert row[1:5] == shown, row[0]
        assert row[5:7] == [f"{r['auto_over_fastest']:.2f}x", f"{r['measuring_seconds']:.1f} s"], row[0]
    worst = max(r["auto_over_fastest"] for r in records.values())
    _expect(
        CONFIGS, "(within {} of the fastest fixed strategy on every CPU workload", f"{100 * (worst - 1):.1f}%"
    )


def _cpu_records() -> dict[tuple[str, str], dict]:
    """The records of the CPU table's configurations (cpu.json also holds meta-batch and step sweeps)."""
    shown = {"sinusoid": (5, 25), "omniglot5w5s": (1, 32), "omniglot20w1s": (1, 16), "miniimagenet": (1, 4)}
    return {
        (r["workload"], r["engine"]): r
        for r in _json("cpu.json")
        if (r["inner_steps"], r["meta_batch"]) == shown[r["workload"]]
    }


def test_cpu_table_equals_cpu_json():
    records, workload = _cpu_records(), None
    for row in _table(BENCH, "| workload | engine | median ms |"):
        workload = AUTO_WORKLOADS[row[0].split(",")[0]] if row[0] else workload
        engine = (
            re.sub(r" \(\w+\)$", "", row[1]).replace(" + ", "+").replace("fmaml ", "fmaml_").replace(" ", "_")
        )
        r = records[(workload, engine)]
        shown = [_ms(1000 * r["median_s"]), f"{r['peak_mem_mb']:.1f}", f"{r['speedup_vs_higher']:.2f}x"]
        assert row[2:5] == shown, (workload, engine)
        diff = f"{r['max_grad_diff']:.1e}" + (
            f" (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        )
        assert row[5] == diff, (workload, engine)


def test_cpu_prose_equals_cpu_json():
    r = _cpu_records()
    convs = ("omniglot5w5s", "omniglot20w1s", "miniimagenet")

    def speedups(engine, workloads=convs):
        return sorted(r[(w, engine)]["speedup_vs_higher"] for w in workloads)

    vmap_over_loop = sorted(
        r[(w, "fmaml_vmap")]["median_s"] / r[(w, "fmaml_loop")]["median_s"] for w in convs
    )
    memory = sorted(r[(w, "fmaml_vmap")]["peak_mem_mb"] / r[(w, "fmaml_loop")]["peak_mem_mb"] for w in convs)
    _expect(
        BENCH,
        "slow on CPU: {} to {} slower than the loop here, and {} to {} the memory",
        *(f"{v:.2f}x" for v in (vmap_over_loop[0], vmap_over_loop[-1], memory[0], memory[-1])),
    )
    auto, first = speedups("fmaml_auto"), speedups("fmaml_first_order")
    _expect(
        BENCH,
        "`higher` ({} to {} in this run), and first order is {} to {} faster",
        *(f"{v:.2f}x" for v in (auto[0], auto[-1], first[0], first[-1])),
    )
    _expect(
        CONFIGS,
        "ConvNets {} to {} (`auto`: loop), first order {} to {}.",
        *(f"{v:.2f}x" for v in (auto[0], auto[-1], first[0], first[-1])),
    )
    sinusoid = {e: r[("sinusoid", e)]["speedup_vs_higher"] for e in ("fmaml_auto", "fmaml_vmap+compile")}
    _expect(
        CONFIGS,
        "the sinusoid {} faster (`auto`: vmap), {} compiled",
        f"{sinusoid['fmaml_auto']:.1f}x",
        f"{sinusoid['fmaml_vmap+compile']:.0f}x",
    )
    _expect(
        FRONT,
        "adapts in one vectorised computation ({} `higher`'s speed on the sinusoid, compiled)",
        f"{sinusoid['fmaml_vmap+compile']:.0f}x",
    )
    _expect(
        BENCH,
        "`auto` is {} faster than `higher`; compiled, {}.",
        f"{sinusoid['fmaml_auto']:.1f}x",
        f"{sinusoid['fmaml_vmap+compile']:.0f}x",
    )
    compiled, eager = r[("sinusoid", "fmaml_vmap+compile")], r[("sinusoid", "fmaml_vmap")]
    _expect(
        BENCH,
        "the compiled step takes {} ms against {} ms eager under `vmap`, after {} s of compilation",
        _ms(1000 * compiled["median_s"]),
        _ms(1000 * eager["median_s"]),
        f"{compiled['compile_s']:.1f}",
    )
    loop_peak = r[("omniglot5w5s", "fmaml_loop")]["peak_mem_mb"]
    _expect(BENCH, "(about {} GB for Omniglot 5w5s at meta-batch 32)", f"{loop_peak / 1000:.1f}")
    loop_vs_vmap = r[("sinusoid", "fmaml_loop")]["median_s"] / r[("sinusoid", "fmaml_vmap")]["median_s"]
    _expect(BENCH, "on the sinusoid MLP vmap is {} faster than the loop", f"{loop_vs_vmap:.1f}x")
    _expect(BENCH, "`higher`: {} ms on Omniglot 5w5s", _ms(1000 * r[("omniglot5w5s", "higher")]["median_s"]))


def test_gradient_agreement_equals_gradient_agreement_json():
    worst = _json("gradient_agreement.json")["largest_relative_error_vs_higher_float64"]
    rows = _table(BENCH, "| strategy | largest relative error")
    assert {row[0]: row[1] for row in rows} == {s: f"{e:.1e}" for s, e in worst.items()}
    largest = f"{max(worst.values()):.1e}"
    _expect(FRONT, "Every gradient equals `higher`'s to {} in float64", largest)
    _expect(BENCH, "the measured worst case is {}, see below", largest)


# ------------------------------------------------------------------------------------------ throughput


def test_throughput_tables_equal_throughput_cpu_json():
    records = _json("throughput_cpu.json")
    samples = {(r["config"], r["sampler"]): r["median_ms"] for r in records if r["what"] == "sample"}
    for row in _table(BENCH, "| config | sampling one meta-batch"):
        config = row[0].split("`")[1].removesuffix(".yaml")
        torchmeta, tensor = samples[(config, "torchmeta")], samples[(config, "tensor")]
        assert row[1:4] == [f"{torchmeta:.3g} ms", f"{tensor:.3g} ms", f"{torchmeta / tensor:.0f}x"], config
    speedup = samples[("omniglot", "torchmeta")] / samples[("omniglot", "tensor")]
    _expect(FRONT, "sampled as tensor ops on the device, {} faster than torchmeta's", f"{speedup:.0f}x")
    load = next(
        r["load_s"]
        for r in records
        if (r["config"], r["what"], r["sampler"]) == ("omniglot", "sample", "tensor")
    )
    _expect(CONFIGS, "as uint8, in {} s in `benchmarks/throughput.py`'s run", f"{load:.1f}")
    steps = [r for r in records if r["what"] in ("bare", "fit")]
    rows = _table(BENCH, "| config | run | ms per meta-step |")
    assert len(rows) == len(steps)
    for row, r in zip(rows, steps, strict=True):
        assert row[2] == (f"{r['step_ms']:.2f}" if r["step_ms"] < 100 else _thousands(r["step_ms"])), row
        assert row[3] == (
            f"{r['steps_per_s']:.1f}" if r["steps_per_s"] >= 10 else f"{r['steps_per_s']:.2f}"
        ), row
        assert row[4] == (f"{r['vs_bare']:.0%}" if r["what"] == "fit" else "100%"), row
    sinusoid_fit = [
        r for r in steps if r["config"] == "sinusoid" and r["what"] == "fit" and r["sampler"] == "tensor"
    ]
    lightning = sorted(r["lightning_ms"] for r in sinusoid_fit)
    share = sorted(1 - r["vs_bare"] for r in sinusoid_fit)
    omniglot_fit = next(
        r for r in steps if r["config"] == "omniglot" and r["what"] == "fit" and r["sampler"] == "tensor"
    )
    _expect(BENCH, "On Omniglot that is noise ({})", f"{omniglot_fit['vs_bare']:.0%}")
    _expect(BENCH, "What remains, about {} to {} ms per step", f"{lightning[0]:.1f}", f"{lightning[-1]:.1f}")
    _expect(
        BENCH, "on an 8 ms sinusoid step it is {} to {}.", f"{100 * share[0]:.0f}", f"{100 * share[-1]:.0f}%"
    )


@pytest.mark.parametrize("readme", READMES, ids=_name)
def test_figures_point_to_existing_results_files(readme):
    """Every `benchmarks/results/...` path a README names exists, so no figure points at a missing file."""
    named = set(re.findall(r"(?:benchmarks/)?results/[\w./{},-]+\.(?:json|csv|png|md)", readme.read_text()))
    missing = []
    for path in named:
        full = path if path.startswith("benchmarks/") else "benchmarks/" + path
        if "{" in full:  # a brace list, as in memory_cpu_{batch,steps}.json
            head, options, tail = re.match(r"(.*)\{(.*)\}(.*)", full).groups()
            missing += [
                head + o + tail for o in options.split(",") if not (ROOT / (head + o + tail)).exists()
            ]
        elif "<" not in full and not (ROOT / full).exists():
            missing.append(full)
    assert not missing, f"{_name(readme)} names results files that do not exist: {missing}"


# ------------------------------------------------------------------------------------ inner optimizers

INNER_CONFIGS = {  # the README's workload cell -> (workload, inner steps, meta-batch) in inner_optimizers_cpu.json
    "sinusoid, 5 steps, 25 tasks": ("sinusoid", 5, 25),
    "Omniglot 5w5s, 1 step, 32 tasks": ("omniglot5w5s", 1, 32),
    "Omniglot 5w5s, 5 steps, 8 tasks": ("omniglot5w5s", 5, 8),
}


def _inner_optimizer_rows() -> dict[tuple, dict[str, dict]]:
    """(workload, steps, meta-batch, inner optimizer) -> {engine: record}."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in _json("inner_optimizers_cpu.json"):
        key = (r["workload"], r["inner_steps"], r["meta_batch"], r["inner_optimizer"])
        rows.setdefault(key, {})[r["engine"]] = r
    return rows


def _fastest_fmaml(engines: dict[str, dict]) -> dict:
    timed = [r for name, r in engines.items() if name.startswith("fmaml") and r.get("median_s")]
    return min(timed, key=lambda r: r["median_s"])


def test_inner_optimizer_speed_table_equals_inner_optimizers_cpu_json():
    records, workload = _inner_optimizer_rows(), None
    rows = _table(BENCH, "| workload (inner loop) | inner optimizer |")
    assert len(rows) == len(records)
    for row in rows:
        workload = INNER_CONFIGS[row[0]] if row[0] else workload
        engines = records[(*workload, row[1])]
        higher, fastest = engines["higher"], _fastest_fmaml(engines)
        assert row[2] == _ms(1000 * higher["median_s"]), row
        assert row[3] == f"{_ms(1000 * fastest['median_s'])} ({fastest['engine'].removeprefix('fmaml_')})", (
            row
        )
        assert row[4] == _ratio(higher["median_s"] / fastest["median_s"]), row
        assert row[5] == f"{fastest['max_grad_rel_diff']:.1e}", row


def test_adam_speed_prose_equals_inner_optimizers_cpu_json():
    records = _inner_optimizer_rows()
    ratios = []
    for workload in [("sinusoid", 5, 25), ("omniglot5w5s", 1, 32)]:
        engines = records[(*workload, "adam")]
        ratios.append(_ratio(engines["higher"]["median_s"] / _fastest_fmaml(engines)["median_s"]))
    _expect(CONFIGS, "with an Adam inner loop, fmaml's fastest strategy is {} `higher`'s speed on the sinusoid "
            "and {} on Omniglot 5w5s", *ratios)  # fmt: skip


def test_adam_memory_table_equals_memory_cpu_adam_steps_json():
    records = _memory("memory_cpu_adam_steps.json")
    for row in _table(BENCH, "| engine (Adam inner loop) | 1 step |"):
        engine = row[0].replace(" + ", "+")
        growth = [records[(engine, s)]["growth_mb"] for s in (1, 5, 10, 20)]
        assert row[1:5] == [f"{_thousands(growth[0])} MB", *map(_thousands, growth[1:])], engine
        assert row[5] == _ratio(growth[3] / growth[0]), engine


def test_adam_recipe_table_equals_its_results_json():
    results = _json("recipes_5w1s_adam/results.json")
    rows = _table(BENCH, "| recipe, one run beside the other |")
    for recipe, prefix in {"maml": "MAML (", "maml_adam": "MAML, Adam inner loop"}.items():
        _assert_recipe_row(_row(rows, prefix), results[recipe], recipe)


def test_adam_memory_and_recipe_prose_equal_their_files():
    records = _memory("memory_cpu_adam_steps.json")
    growth = records[("loop+recompute", 20)]["growth_mb"] / records[("loop+recompute", 1)]["growth_mb"]
    _expect(
        CONFIGS,
        "keeps an Adam inner loop's memory flat ({} from 1 to 20 steps with the loop)",
        _ratio(growth),
    )
    r = _json("recipes_5w1s_adam/results.json")
    shown = [f"{100 * r[name]['test3'][0]:.2f} %" for name in ("maml_adam", "maml")]
    _expect(CONFIGS, "trained far worse than SGD at the same budget ({} against {},", *shown)


# ------------------------------------------------------------------------------------ iMAML and Reptile


def test_imaml_memory_table_equals_memory_cpu_imaml_steps_json():
    records = {(r.get("meta_gradient", "maml"), r["value"]): r for r in _json("memory_cpu_imaml_steps.json")}
    rows = _table(BENCH, "| meta-gradient (loop, meta-batch 8) |")
    for meta_gradient, prefix in {"maml": "MAML (store)", "implicit": "iMAML", "reptile": "Reptile"}.items():
        growth = [records[(meta_gradient, s)]["growth_mb"] for s in (1, 5, 10, 20)]
        row = _row(rows, prefix)
        assert row[1:5] == [f"{_thousands(growth[0])} MB", *map(_thousands, growth[1:])], meta_gradient
        assert row[5] == _ratio(growth[3] / growth[0]), meta_gradient
    imaml = records[("implicit", 20)]["growth_mb"] / records[("implicit", 1)]["growth_mb"]
    assert imaml <= 1.3, "issue 21's target: iMAML's memory flat (<= 1.3x) from 1 to 20 inner steps"


def test_imaml_cg_table_equals_imaml_cg_json():
    workloads = _json("imaml_cg.json")["workloads"]
    columns = [(w, lam) for w in ("sinusoid", "omniglot5w1s") for lam in ("2.0", "10.0", "100.0")]
    rows = _table(BENCH, "| CG iterations |")
    for k in ("1", "2", "3", "5", "10", "20"):
        shown = [f"{workloads[w][lam]['relative_error'][k]:.1e}" for w, lam in columns]
        (row,) = [row for row in rows if row[0] == k]
        assert row[1:] == shown, k
    eigenvalues = [workloads[w][lam]["eigenvalues_of_I_plus_H_over_lam"] for w, lam in columns]
    shown = [f"[{e['lowest']:.2f}, {e['highest']:.1f}]" for e in eigenvalues]
    assert _row(rows, "eigenvalues")[1:] == shown


def test_mamlpp_bn_statistics_table_equals_its_json():
    r = _json("mamlpp_bn_statistics.json")
    rows = _table(BENCH, "| evaluation normalises with |")
    assert _row(rows, "per-step running statistics")[1] == _pct_ci(
        (r["per_step_running_statistics"]["mean"], r["per_step_running_statistics"]["ci95"])
    )
    assert _row(rows, "each batch's own")[1] == _pct_ci(
        (r["batch_statistics"]["mean"], r["batch_statistics"]["ci95"])
    )
