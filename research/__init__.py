"""The experiment kit behind `results/`: not part of the installed `hf_koopman` package.

* `research.experiments` — runners, grids, tasks, divergence labels, statistics and report helpers of the RKSP and
  ReyNet studies.
* `research.data` — offline readers of the studies' data (TU graphs, GP tasks, MNIST / clock digits).
* `research.rksp_gpt` — the research GPT / ViT with a switchable normalisation (registers `rksp_gpt` with the Auto
  classes when imported).
* `research.scripts` — the scripts that regenerate `results/`, run from the repository root as
  `python -m research.scripts.NAME`.

It builds on `hf_koopman`; `hf_koopman` never imports it. Install its extra dependencies with
`pip install -e ".[research]"`.
"""
