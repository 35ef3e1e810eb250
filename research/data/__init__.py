"""Offline data readers and samplers of the ReyNet and EquivCNP studies (`research/scripts/train_*.py`).

Every reader takes the data folder as an argument (or `HF_KOOPMAN_DATA`); nothing is downloaded.

* `graphs` — TU graph benchmarks (GIN one-file format) as dense graph tensors for ReyNet.
* `equivcnp_gp` — 1-D Gaussian-process regression tasks (RBF, Matérn-5/2, periodic) for EquivCNP.
* `equivcnp_images` — MNIST IDX reader, seven-segment "clock" digits and pixel-completion tasks for EquivCNP.
"""
