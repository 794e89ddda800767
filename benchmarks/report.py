"""Write docs/benchmarks.md from the results the benchmark scripts left in benchmarks/results/.

Every table is built from the JSON records alone and names the commands that made them. Run
after any benchmark script (no model is trained here):

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _common import RESULTS

OUTPUT = Path(__file__).parents[1] / "docs" / "benchmarks.md"
OURS = "ContrastiveVAE"

INTRODUCTION = """# Benchmarks

Run by hand, never in CI: each script in `benchmarks/` writes its records into
`benchmarks/results/<script>.json`, and `.venv/bin/python benchmarks/report.py` rewrites this
page from them. Every table names the commands that made it. Rows labelled "0.2 defaults" ran
the package as of commit 07b9b10 (`PYTHONPATH` pointing at a copy of its `src/`) through the same
scripts, with 0.2's recommended `train_size=0.75` for its held-out test. Rows labelled "0.1
objective" ran the same 0.2 code with `counterfactual_controls=False, independence_weight=0`
(the objective of 0.1). Rows labelled "0.3 defaults" ran commit 6cf9c2f; later commits change
no computation of training or of the outputs (mixed precision is opt-in).
"""

SCREEN_ROWS = {
    "epochs": ("epochs trained (early stopping on, at most 100)", "{:.0f}"),
    "effect_called": ("effect targets called, p < 0.05", "sum"),
    "null_called": ("null targets called, p < 0.05 (they knock down their own gene)", "sum"),
    "calling_auroc": (
        "calling AUROC, effect against null targets, by the test's distance",
        "{:.3f}",
    ),
    "program_separation": ("program separation, salient (15-NN balanced accuracy)", "{:.3f}"),
    "responders_vs_controls": ("responders against controls, salient, every cell", "{:.3f}"),
    "responders_vs_controls_held_out": ("the same, validation cells only", "{:.3f}"),
    "subclone_accuracy": ("subclone leakage (balanced accuracy, lower is better)", "{:.3f}"),
    "cell_cycle_r2": ("cell-cycle leakage (R², lower is better)", "{:.3f}"),
    "stress_r2": ("stress leakage (R², lower is better)", "{:.3f}"),
    "responder_auroc": (
        "responder AUROC, all targeting cells (null targets' cells count as non-responders)",
        "{:.3f}",
    ),
    "responder_auroc_effect_targets": ("responder AUROC, effect targets' cells", "{:.3f}"),
    "knockdown_auroc": (
        "AUROC against cells that did not escape (own-gene knockdown), all targeting",
        "{:.3f}",
    ),
    "de_map_p_value": ("DE mAP, genes by p-value", "{:.3f}"),
    "de_map_proba_de": ("DE mAP, genes by `proba_de`", "{:.3f}"),
    "de_fdp": ("DE false discovery proportion at 5% FDR", "{:.3f}"),
    "de_tpr": ("DE true genes found at 5% FDR", "{:.3f}"),
    "null_own_gene_found": ("null targets whose own gene is found at 5% FDR", "{:.2f}"),
    "null_other_genes_flagged": ("null targets: other genes flagged (all seeds)", "sum"),
    "null_p_below_05": ("null targets, every cell: share of p-values < 0.05", "{:.3f}"),
    "seconds_per_epoch": ("seconds per epoch (one torch thread, machine shared)", "{:.2f}"),
}


OUT_OF = {"effect_called": "n_effect", "null_called": "n_null"}


def load(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else []


def cell(values: list, how: str, totals: list | None = None) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return "–"
    if how == "sum":
        total = f"{int(np.sum(values))}"
        if totals:
            total += f" of {int(np.sum(totals))}"
        return total + (f" ({' / '.join(str(int(v)) for v in values)})" if len(values) > 1 else "")
    mean = how.format(np.mean(values))
    if len(values) == 1:
        return mean
    return f"{mean} ({' / '.join(how.format(v) for v in values)})"


def columns(records: list[dict]) -> list[tuple[str, str]]:
    """(method, label) pairs in display order: ours by label, then the anchors."""
    pairs = list(dict.fromkeys((r["method"], r["label"]) for r in records))
    ours = sorted((p for p in pairs if p[0] == OURS), key=lambda p: p[1], reverse=True)
    return ours + [p for p in pairs if p[0] != OURS]


def screens_section() -> list[str]:
    records = load("screens")
    if not records:
        return []
    lines = [
        "## Simulated screens (`benchmarks/screens.py`)",
        "",
        "10,000 cells × 2,000 genes, screen seed 0; `core`: 12 targets (3 null), program log fold "
        "change 0.8; `calling`: 24 targets (8 null), 0.4; `hard`: 24 targets (8 null), 0.3, half "
        "the cells escape, 2,000 UMIs per cell. ContrastiveVAE is trained as a user would "
        "(`max_epochs=100`, early stopping on) with model seeds 0, 1 and 2; cells give the mean "
        "and each seed. Targets are called with the package's own test: 0.3's every-cell test "
        "against the contrast controls; 0.2's held-out test; for the anchors, pertpy's "
        "`DistanceTest` on every cell against all controls. Null targets knock down their own "
        "gene, which is in the data, so calling one is not strictly a false positive.",
        "",
    ]
    for screen in ("calling", "hard", "core"):
        chosen = [r for r in records if r["screen"] == screen]
        if not chosen:
            continue
        pairs = columns(chosen)
        header = [f"{method}, {label}" if method == OURS else method for method, label in pairs]
        lines += [f"### {screen} screen", "", "| | " + " | ".join(header) + " |"]
        lines.append("|---|" + "---|" * len(pairs))
        for key, (name, how) in SCREEN_ROWS.items():
            row = []
            for method, label in pairs:
                runs = sorted(
                    (r for r in chosen if r["method"] == method and r["label"] == label),
                    key=lambda r: r["seed"],
                )
                totals = [r.get(OUT_OF[key]) for r in runs] if key in OUT_OF else None
                row.append(cell([r.get(key) for r in runs], how, totals))
            if any(value != "–" for value in row):
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines += ["", *commands(chosen), ""]
    return lines


def commands(records: list[dict]) -> list[str]:
    made = sorted({(r["command"], r.get("date", "")) for r in records})
    return ["Made by " + "; ".join(f"`{command}` ({date})" for command, date in made) + "."]


def papalexi_section() -> list[str]:
    records = load("papalexi")
    calibration = [r for r in records if r["part"] == "calibration"]
    model = [r for r in records if r["part"] == "model"]
    lines = []
    if calibration:
        lines += calibration_table(calibration)
    if model:
        lines += model_table(model)
    return lines


def calibration_table(records: list[dict]) -> list[str]:
    lines = [
        "## Papalexi negative controls (`benchmarks/papalexi.py --part calibration`)",
        "",
        "The bundled THP-1 subset; per check seed, half of the 9 non-targeting guides become "
        "pseudo-targets (null by construction) and the default model is trained on them with "
        "the real targets (`pc.tl.calibration_check`). Anchor: pertpy's `DistanceTest` on a "
        "10-PC PCA of log-normalised counts of the same cells, no training.",
        "",
        "| run | test | pseudo-targets at p < 0.05 | at p < 0.01 | IFN-γ pathway KOs at p < 0.05 | real targets at p < 0.05, per check seed |",
        "|---|---|---|---|---|---|",
    ]
    pathway = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]
    for label in sorted({r["label"] for r in records}, reverse=True):
        runs = sorted((r for r in records if r["label"] == label), key=lambda r: r["seed"])
        tests = list(dict.fromkeys(t for r in runs for t in r["pseudo_target_p_values"]))
        for test in tests:
            p_values = [p for r in runs for p in r["pseudo_target_p_values"].get(test, {}).values()]
            within = "within" in test
            key = "target_p_values_within_batches" if within else "target_p_values"
            pathway_called = [sum(r[key].get(g, 1) < 0.05 for g in pathway) for r in runs]
            real = [sum(p < 0.05 for g, p in r[key].items()) for r in runs]
            lines.append(
                f"| {label} | {test} | {sum(p < 0.05 for p in p_values)} of {len(p_values)} "
                f"| {sum(p < 0.01 for p in p_values)} | "
                f"{' / '.join(f'{n} of 5' for n in pathway_called)} | {' / '.join(map(str, real))} |"
            )
        pca = [p for r in runs for p in r["pca_p_values"].values()]
        lines.append(
            f"| {label} | PCA of log-normalised counts (anchor), every cell, against all controls "
            f"| {sum(p < 0.05 for p in pca)} of {len(pca)} | {sum(p < 0.01 for p in pca)} | – | – |"
        )
    lines += ["", "DE and responder checks on the pseudo-targets (mean over check seeds):", ""]
    lines += [
        "| run | DE p-values < 0.01 / 0.05 / 0.1 (every cell) | pseudo-targets with a DE gene at 5% FDR | pseudo-target cells called KO |",
        "|---|---|---|---|",
    ]
    for label in sorted({r["label"] for r in records}, reverse=True):
        runs = [r for r in records if r["label"] == label]
        de = " / ".join(
            f"{np.mean([r['de_p_below'][level] for r in runs]):.3f}"
            for level in ("0.01", "0.05", "0.1")
        )
        lines.append(
            f"| {label} | {de} | {np.mean([r['de_genes_pseudo_targets_with_any'] for r in runs]):.2f} "
            f"| {np.mean([r['responders_pseudo_targets_with_any'] for r in runs]):.3f} |"
        )
    return [*lines, "", *commands(records), ""]


def model_table(records: list[dict]) -> list[str]:
    lines = [
        "## Papalexi: leakage and responders (`benchmarks/papalexi.py --part model`)",
        "",
        "The default model on the real labels, model seeds 0, 1 and 2 (mean and each seed). "
        "Replicate: 15-NN balanced accuracy (chance 0.333); library: 15-NN R² of the log total "
        "count; both from the salient latent of the perturbed cells, lower is better.",
        "",
        "| run | epochs | replicate | log-library R² | targets called | called KO: IFNGR1 / IFNGR2 / JAK2 / STAT1 / IRF1 |",
        "|---|---|---|---|---|---|",
    ]
    for method, label in columns(records):
        runs = sorted(
            (r for r in records if r["method"] == method and r["label"] == label),
            key=lambda r: r["seed"],
        )
        name = f"{method}, {label}" if method == OURS else method
        epochs = cell([r.get("epochs") for r in runs], "{:.0f}")
        called = (
            cell([len(r["targets_called"]) for r in runs], "{:.1f}")
            if "targets_called" in runs[0]
            else "–"
        )
        ko = "–"
        if "called_ko" in runs[0]:
            ko = " / ".join(
                f"{np.mean([r['called_ko'][g] for r in runs]):.2f}"
                for g in ("IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1")
            )
        lines.append(
            f"| {name} | {epochs} | {cell([r['replicate_accuracy'] for r in runs], '{:.3f}')} "
            f"| {cell([r['library_r2'] for r in runs], '{:.3f}')} | {called} | {ko} |"
        )
    return [*lines, "", *commands(records), ""]


def road_section() -> list[str]:
    records = load("road_time")
    if not records:
        return []
    lines = [
        "## The road after training (`benchmarks/road_time.py`)",
        "",
        "ContrastiveVAE trained as a user would (early stopping on), then each "
        "stage after `train` timed in the same process, one torch thread: `write_outputs()` "
        "(latents, target calls, responder calls, the two dense layers), "
        "`differential_expression()` (every target, one call) and `distance_test()` (1,000 "
        "permutations). The ratio is the stage's seconds over the same run's training seconds; "
        "peak memory is the sampled rise of resident memory during the stage. Cells give the "
        "mean and each model seed. One untimed pass of the road ran first, so that one-time "
        "costs (numba compilation, lazy imports) count in no stage.",
        "",
    ]
    stages = {
        "train": "`train`",
        "write_outputs": "`write_outputs()`",
        "differential_expression": "`differential_expression()`, every target",
        "distance_test": "`distance_test()`",
    }
    for screen, n_cells, n_genes in sorted(
        {(r["screen"], r["cells"], r["genes"]) for r in records}
    ):
        runs = sorted(
            (
                r
                for r in records
                if (r["screen"], r["cells"], r["genes"]) == (screen, n_cells, n_genes)
            ),
            key=lambda r: r["seed"],
        )
        lines += [
            f"### {screen} screen, {n_cells:,} cells × {n_genes:,} genes, "
            f"{runs[0]['n_targets']} targets",
            "",
            "| stage | seconds | ratio to training | peak memory rise (MB) |",
            "|---|---|---|---|",
        ]
        for stage, name in stages.items():
            ratio = cell([r.get(f"ratio_{stage}") for r in runs], "{:.2f}")
            lines.append(
                f"| {name} | {cell([r[f'seconds_{stage}'] for r in runs], '{:.1f}')} "
                f"| {'1' if stage == 'train' else ratio} "
                f"| {cell([r[f'peak_mb_{stage}'] for r in runs], '{:.0f}')} |"
            )
        lines += [
            "",
            f"Epochs trained (at most {runs[0].get('max_epochs', 100)}): "
            f"{cell([r['epochs'] for r in runs], '{:.0f}')}.",
        ]
        lines += ["", *commands(runs), ""]
    return lines


def epoch_time_section() -> list[str]:
    records = load("epoch_time")
    timings = sorted(
        (r for r in records if r["kind"] == "timing"), key=lambda r: (r["cells"], r["batch_size"])
    )
    profiles = [r for r in records if r["kind"] == "profile"]
    if not timings and not profiles:
        return []
    methods = ("ContrastiveVAE", "ContrastiveVI")
    lines = [
        "## Seconds per epoch (`benchmarks/epoch_time.py`)",
        "",
        "ContrastiveVAE against scvi-tools' ContrastiveVI on the simulated core screen, equal "
        "latent sizes (10 + 10), hidden layer (128), training share (90%) and cells per group per "
        "step; early stopping off. A run's seconds per epoch is the median of its timed epochs "
        "(after a warm-up epoch); the methods alternate, and each pair's ratio (ContrastiveVAE "
        "over ContrastiveVI) is given, since only a ratio measured side by side compares across "
        "runs on a shared machine. Seconds per epoch: the median over the runs; cells per "
        "second: the training cells over it.",
        "",
    ]
    if timings:
        lines += [
            "| cells × genes | cells per group per step | ContrastiveVAE s / epoch "
            "| ContrastiveVI s / epoch | ratio, median (range) | ratio per pair "
            "| ContrastiveVAE cells / s | ContrastiveVI cells / s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        repeated = set()
        for r in timings:
            seconds = {m: float(np.median(r["seconds_per_epoch"][m])) for m in methods}
            ratios = r["ratios"]
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            size = f"{r['cells']:,} × {r['genes']:,}"
            if r["simulated_cells"] < r["cells"]:
                size += "*"
                repeated.add(r["simulated_cells"])
            lines.append(
                f"| {size} | {r['batch_size']} | {seconds[methods[0]]:.2f} "
                f"| {seconds[methods[1]]:.2f} | **{np.median(ratios):.2f}**{spread} "
                f"| {', '.join(f'{v:.2f}' for v in ratios)} | "
                + " | ".join(f"{r['train_size'] * r['cells'] / seconds[m]:,.0f}" for m in methods)
                + " |"
            )
        if repeated:
            lines += [
                "",
                "\\* The cells of a "
                + " or ".join(f"{n:,}" for n in sorted(repeated))
                + "-cell simulated screen, repeated.",
            ]
        lines += ["", *commands(timings), ""]
    for r in sorted(profiles, key=lambda r: (r["cells"], r["batch_size"])):
        lines += [
            f"Where a ContrastiveVAE step spends its time, {r['cells']:,} cells, "
            f"{r['batch_size']} per group per step (one epoch of {r['steps']} steps):",
            "",
            "| part of the step | ms per step | share |",
            "|---|---|---|",
        ]
        parts = r["milliseconds_per_step"]
        total = sum(v for part, v in parts.items() if not part.startswith("forward:"))
        for part, value in parts.items():
            name = f"&nbsp;&nbsp;{part}" if part.startswith("forward:") else part
            lines.append(f"| {name} | {value:.1f} | {value / total:.0%} |")
        lines += [f"| whole step | {total:.1f} | 100% |", "", *commands([r]), ""]
    return lines


def gpu_section() -> list[str]:
    records = sorted(load("gpu_epoch_time"), key=lambda r: (r["cells"], r["precision"]))
    lines = [
        "## Seconds per epoch on a GPU (`benchmarks/gpu_epoch_time.py`)",
        "",
    ]
    if not records:
        return [
            *lines,
            "Not measured: no machine of the project has a GPU. On a machine with a CUDA GPU, "
            "`.venv/bin/python benchmarks/gpu_epoch_time.py` fills this table (about 8 minutes "
            "on one H100).",
            "",
        ]
    lines += [
        "| GPU | cells × genes | ContrastiveVAE precision | ContrastiveVAE s / epoch "
        "| ContrastiveVI s / epoch | ratio per pair |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ours, theirs = (
            r["seconds_per_epoch"]["ContrastiveVAE"],
            r["seconds_per_epoch"]["ContrastiveVI"],
        )
        lines.append(
            f"| {r['gpu']} | {r['cells']:,} × {r['genes']:,} | {r['precision']} "
            f"| {np.median(ours):.2f} | {np.median(theirs):.2f} "
            f"| {', '.join(f'{v:.2f}' for v in r['ratios'])} |"
        )
    return [*lines, "", *commands(records), ""]


def memory_section() -> list[str]:
    records = load("memory_scale")
    if not records:
        return []
    lines = [
        "## Peak memory, in memory against backed (`benchmarks/memory_scale.py`)",
        "",
        "The simulated core screen, counts stored as sparse CSR in h5ad; each run in a fresh "
        "process reads the file (in memory, or `backed='r'`), trains one epoch and writes the "
        "outputs (in memory: `write_outputs()`, its two dense layers in the AnnData; backed: "
        "`write_outputs(layers_file=...)`, streaming the layers into a new file). Peak resident "
        "set size (`VmHWM`), cumulative up to each point.",
        "",
        "| cells × genes | data | peak RSS after reading (MB) | after training 1 epoch (MB) "
        "| after the outputs (MB) | seconds to the end |",
        "|---|---|---|---|---|---|",
    ]
    repeated = set()
    order = {"in memory": 0, "backed": 1}
    for r in sorted(records, key=lambda r: (r["cells"], r["genes"], order.get(r["mode"], 2))):
        size = f"{r['cells']:,} × {r['genes']:,}"
        if r["simulated_cells"] < r["cells"]:
            size += "*"
            repeated.add(r["simulated_cells"])
        peaks = " | ".join(
            f"{r[f'peak_mb_{phase}']:,.0f}" for phase in ("read", "trained", "outputs")
        )
        lines.append(f"| {size} | {r['mode']} | {peaks} | {r['seconds']:.0f} |")
    if repeated:
        lines += [
            "",
            "\\* The cells of a "
            + " or ".join(f"{n:,}" for n in sorted(repeated))
            + "-cell simulated screen, repeated, each repeat with targets of its own (cells per "
            "target stay constant, as in genome-wide screens).",
        ]
    return [*lines, "", *commands(records), ""]


def ddp_section() -> list[str]:
    records = load("ddp_scaling")
    if not records:
        return []
    lines = [
        "## One process against two, DDP (`benchmarks/ddp_scaling.py`)",
        "",
        "The simulated core screen; early stopping off, validation every epoch, the default "
        "model and batch size. One process uses 2 torch threads, two processes (Lightning DDP, "
        "gloo on CPU) 1 each, on 2 cores. With 2 processes an epoch has half as many optimiser "
        "steps, each on twice as many cells. The validation −ELBO is per cell, averaged over "
        "the ranks; program separation and subclone leakage of the salient latent as in "
        "`screens.py`.",
        "",
    ]
    for n_cells, n_genes, epochs in sorted(
        {(r["cells"], r["genes"], r["epochs"]) for r in records}
    ):
        runs = sorted(
            (
                r
                for r in records
                if (r["cells"], r["genes"], r["epochs"]) == (n_cells, n_genes, epochs)
            ),
            key=lambda r: (r["seed"], r["processes"], r["lr"]),
        )
        lines += [
            f"### {n_cells:,} cells × {n_genes:,} genes, {epochs} epoch{'s' * (epochs != 1)}",
            "",
            "| model seed | processes | learning rate | training seconds | ratio to 1 process "
            "| final validation −ELBO | program separation | subclone accuracy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines.append(
                f"| {r['seed']} | {r['processes']} | {r['lr']:g} | {r['seconds']:.0f} "
                f"| {r['ratio_to_one_process']:.2f} | {r['elbo_validation']:.1f} "
                f"| {r['program_separation']:.3f} | {r['subclone_accuracy']:.3f} |"
            )
        lines += ["", *commands(runs), ""]
    return lines


def main():
    sections = [
        INTRODUCTION,
        *screens_section(),
        *papalexi_section(),
        *road_section(),
        *epoch_time_section(),
        *gpu_section(),
        *memory_section(),
        *ddp_section(),
    ]
    OUTPUT.write_text("\n".join(sections).rstrip("\n") + "\n")
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1000:.0f} KB)")


if __name__ == "__main__":
    main()
