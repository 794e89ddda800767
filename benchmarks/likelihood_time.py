"""Milliseconds of the ZINB log-likelihood and its gradient on a training minibatch.

ContrastiveVAE's likelihood (``pertpy_contrastive._likelihoods``) against scvi-tools'
``log_zinb_positive`` (the formula ContrastiveVI trains with), both summed over each cell's
genes, forward and backward, in one run and alternating, so that the ratio is measured against
its anchor on the same machine state. The inputs are those of a real training step: the model
trains ``--epochs`` epochs on the simulated core screen (10,000 cells x 2,000 genes by default),
then the counts, means, inverse dispersions and gate logits of one training minibatch are
captured from the likelihood's call. On the same minibatch, the float32 gradients of both are
compared with scvi-tools' formula in float64: the largest absolute error over the entries,
relative to the largest absolute gradient.

Run alone, by hand:  .venv/bin/python benchmarks/likelihood_time.py --output docs/benchmark_likelihood_time.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from pathlib import Path

import torch
from benchmark_core import CONTROL, large_screen, milliseconds, write_results
from scvi.distributions._negative_binomial import log_zinb_positive

import pertpy_contrastive as pc
from pertpy_contrastive import _likelihoods


def training_minibatch(n_cells: int, n_genes: int, n_epochs: int) -> dict[str, torch.Tensor]:
    """Counts and ZINB parameters of the last training minibatch after ``n_epochs`` epochs."""
    adata = large_screen(n_cells, n_genes, seed=0)
    pc.ContrastiveVAE.setup_anndata(
        adata, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(adata, n_salient=10, n_background=10, seed=0)
    captured = {}
    log_prob = _likelihoods.ZeroInflatedNegativeBinomial.log_prob

    def capturing_log_prob(distribution, value):
        if torch.is_grad_enabled():
            captured.update(
                counts=value,
                mu=distribution.mu,
                theta=distribution.theta,
                gate_logits=distribution.gate_logits,
            )
        return log_prob(distribution, value)

    _likelihoods.ZeroInflatedNegativeBinomial.log_prob = capturing_log_prob
    try:
        model.train(max_epochs=n_epochs, early_stopping=False, enable_progress_bar=False)
    finally:
        _likelihoods.ZeroInflatedNegativeBinomial.log_prob = log_prob
    return {key: value.detach().clone() for key, value in captured.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--repeats", type=int, default=30, help="calls timed per round")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_likelihood_time.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    batch = training_minibatch(args.cells, args.genes, args.epochs)
    counts = batch["counts"]
    mu, gate_logits = (batch[key].requires_grad_() for key in ("mu", "gate_logits"))
    log_theta = batch["theta"].log().requires_grad_()

    def our_loss(counts, mu, log_theta, gate_logits):
        distribution = _likelihoods.ZeroInflatedNegativeBinomial(mu, log_theta.exp(), gate_logits)
        return distribution.log_prob(counts).sum()

    def scvi_tools_loss(counts, mu, log_theta, gate_logits):
        theta = log_theta.exp().expand(mu.shape)
        return log_zinb_positive(counts, mu, theta, gate_logits).sum(-1).sum()

    def ours():
        our_loss(counts, mu, log_theta, gate_logits).backward()

    def scvi_tools():
        scvi_tools_loss(counts, mu, log_theta, gate_logits).backward()

    def gradients(loss, dtype) -> list[torch.Tensor]:
        leaves = [v.detach().to(dtype).requires_grad_() for v in (mu, log_theta, gate_logits)]
        loss(counts.to(dtype), *leaves).backward()
        return [leaf.grad.double() for leaf in leaves]

    reference = gradients(scvi_tools_loss, torch.float64)
    precision = {
        name: [
            float((value - truth).abs().max() / truth.abs().max())
            for value, truth in zip(gradients(loss, torch.float32), reference, strict=True)
        ]
        for name, loss in (("ContrastiveVAE", our_loss), ("scvi-tools", scvi_tools_loss))
    }

    seconds = {"ContrastiveVAE": [], "scvi-tools": []}
    for _ in range(args.rounds):
        seconds["ContrastiveVAE"].append(milliseconds(ours, args.repeats))
        seconds["scvi-tools"].append(milliseconds(scvi_tools, args.repeats))
    ratios = sorted(a / b for a, b in zip(*seconds.values(), strict=True))
    lines = [
        "| ContrastiveVAE (ms) | scvi-tools `log_zinb_positive` (ms) | ratio per round | "
        "median ratio |",
        "|---|---|---|---|",
        f"| {statistics.median(seconds['ContrastiveVAE']):.2f} | "
        f"{statistics.median(seconds['scvi-tools']):.2f} | "
        f"{', '.join(f'{r:.2f}' for r in ratios)} | **{statistics.median(ratios):.2f}** |",
        "",
        "Float32 gradients against scvi-tools' formula in float64 (largest absolute error "
        "relative to the largest absolute gradient):",
        "",
        "| gradient in | ContrastiveVAE, float32 | scvi-tools `log_zinb_positive`, float32 |",
        "|---|---|---|",
    ]
    for index, name in enumerate(("mean", "log inverse dispersion", "gate logits")):
        lines.append(
            f"| {name} | {precision['ContrastiveVAE'][index]:.1e} | "
            f"{precision['scvi-tools'][index]:.1e} |"
        )
    header = (
        f"One training minibatch of {counts.shape[0]} cells x {counts.shape[1]} genes "
        f"({(counts == 0).float().mean():.0%} zeros, largest count {int(counts.max())}), captured "
        f"after {args.epochs} epochs on the simulated core screen of {args.cells:,} cells; the "
        "ZINB log-likelihood summed over each cell's genes, forward and backward to the means, "
        "inverse dispersions and gate logits; median milliseconds per call over "
        f"{args.rounds} alternating rounds of {args.repeats} calls; "
        f"{torch.get_num_threads()} torch threads, CPU only."
    )
    command = (
        f"`.venv/bin/python benchmarks/likelihood_time.py --cells {args.cells} --genes "
        f"{args.genes} --epochs {args.epochs} --rounds {args.rounds} --repeats {args.repeats} "
        f"--output {args.output}`"
    )
    write_results(args.output, "Time of the count likelihood", command, header, lines)


if __name__ == "__main__":
    main()
