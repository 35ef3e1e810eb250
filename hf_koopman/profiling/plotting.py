"""Plots of a `SpectralProfile` (matplotlib, Agg backend; an optional extra: `pip install hf-koopman[plot]`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_koopman.koopman.features import CONTRACTIVE_BELOW, NEAR_BAND


if TYPE_CHECKING:
    from hf_koopman.profiling.spectral_profile import SpectralProfile

__all__ = ["plot_eigenvalues", "plot_masses", "plot_profile", "save_plots"]


def _mass_labels(profile: SpectralProfile) -> tuple[tuple[str, str], ...]:
    """`(feature, legend label)` of the four masses, with the bands of this profile's settings: the contractive mass
    counts |λ| < `contractive_below` (0.80 by default), not |λ| < 1."""
    low, high = _band(profile)
    below = float(profile.settings.get("contractive_below", CONTRACTIVE_BELOW))
    return (
        ("near_unit_mass", f"M≈1 (near-unit, {low:.2f} ≤ |λ| ≤ {high:.2f})"),
        ("unstable_mass", f"M>1 (expanding, |λ| > {high:.2f})"),
        ("mid_mass", f"mid ({below:.2f} ≤ |λ| < {low:.2f})"),
        ("contractive_mass", f"M<{below:.2f} (contracting, |λ| < {below:.2f})"),
    )


def _verdict_label(profile: SpectralProfile) -> str:
    """The verdict as the report's bold line says it: "(tentative)" when the reason starts with "tentative:"."""
    from hf_koopman.risk import TENTATIVE

    verdict, reason = profile.rule.decide_profile(profile)
    return f"{verdict} (tentative)" if reason.startswith(TENTATIVE) else verdict


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plotting a SpectralProfile needs matplotlib: pip install 'hf-koopman[plot]' (or pip install matplotlib)"
        ) from err
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _band(profile: SpectralProfile) -> tuple[float, float]:
    low, high = profile.settings.get("near_band", NEAR_BAND)
    return float(low), float(high)


def plot_eigenvalues(profile: SpectralProfile, ax: Any = None) -> Any:
    """Eigenvalues of every layer in the complex plane, coloured by depth, with the unit circle and near-unit band."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
    low, high = _band(profile)
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.fill(
        np.concatenate([high * np.cos(theta), low * np.cos(theta[::-1])]),
        np.concatenate([high * np.sin(theta), low * np.sin(theta[::-1])]),
        color="tab:orange", alpha=0.18, lw=0, label=f"near-unit band [{low:.2f}, {high:.2f}]",
    )
    ax.plot(np.cos(theta), np.sin(theta), color="black", lw=0.8, label="unit circle")
    cmap = plt.get_cmap("viridis")
    count = max(len(profile.eigenvalues), 1)
    radius = high
    for i, eig in enumerate(profile.eigenvalues):
        eig = np.asarray(eig)
        if eig.size:
            radius = max(radius, float(np.abs(eig).max()))
        ax.scatter(eig.real, eig.imag, s=9, color=cmap(i / max(count - 1, 1)), alpha=0.75, lw=0)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(count - 1, 1)))
    bar = ax.figure.colorbar(sm, ax=ax, fraction=0.046, pad=0.04, label="layer")
    from matplotlib.ticker import MaxNLocator

    bar.locator = MaxNLocator(integer=True)  # layers are counted: no 0.2 of a layer
    bar.update_ticks()
    # a few huge outliers (|λ| in the hundreds happens with ill-conditioned activations) would squash the unit circle
    view = min(radius, 3.0)
    outside = sum(int((np.abs(np.asarray(e)) > view).sum()) for e in profile.eigenvalues)
    if outside:
        ax.text(0.98, 0.98, f"{outside} eigenvalue(s) with |λ| > {view:g} not shown (max |λ| = {radius:.3g})",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
    lim = 1.08 * view
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title("DMD eigenvalues per layer")
    ax.legend(loc="lower left", fontsize=7)
    return ax


def plot_masses(profile: SpectralProfile, ax: Any = None) -> Any:
    """Per-layer spectral masses (Definition 1) vs depth; the layers the verdict leaves out (degenerate, not linear,
    too few token states for their width) are marked with a grey background."""
    plt = _pyplot()
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(6.5, 4))
    depth = np.arange(len(profile.layers))
    for field_name, label in _mass_labels(profile):
        ax.plot(depth, [float(getattr(f, field_name)) for f in profile.features], marker="o", ms=3, label=label)
    shaded = False
    for i, read in enumerate(profile.rule.reads(profile)):
        if not read:
            ax.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.2, lw=0,
                       label=None if shaded else "left out of the verdict")
            shaded = True
    # the verdict's thresholds apply to the mean M≈1 only, not to the other curves
    ax.axhline(profile.rule.safe_below, color="tab:green", ls="--", lw=0.8,
               label=f"M≈1 thresholds: safe below {profile.rule.safe_below:g}")
    ax.axhline(profile.rule.high_risk_above, color="tab:red", ls="--", lw=0.8,
               label=f"M≈1 thresholds: high risk above {profile.rule.high_risk_above:g}")
    stacks = profile.stacks
    for i in range(1, len(stacks)):
        if stacks[i] != stacks[i - 1]:
            ax.axvline(i - 0.5, color="black", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (execution order)")
    reliable = " (ResDMD-reliable only)" if profile.settings.get("reliable_only") else ""
    ax.set_ylabel(f"fraction of eigenvalues{reliable}")
    ax.set_title(f"Spectral masses vs depth — verdict: {_verdict_label(profile)}")
    # below the axes: the curves span the whole [0, 1] range, so no corner inside is free of them
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    if own_figure:  # a caller's figure is laid out by its caller (save_plots, plot_profile)
        ax.figure.tight_layout()
    return ax


def plot_profile(profile: SpectralProfile, path: str | Path | None = None) -> Any:
    """Both panels side by side; saved as PNG when `path` is given. Returns the figure."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    plot_eigenvalues(profile, left)
    plot_masses(profile, right)
    if profile.model_name:
        fig.suptitle(f"RKSP profile of {profile.model_name}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def save_plots(profile: SpectralProfile, directory: str | Path) -> dict[str, Path]:
    """Write `eigenvalues.png` and `masses.png` into `directory`; returns caption -> path."""
    plt = _pyplot()
    directory = Path(directory)
    written = {}
    for caption, filename, draw, size in (
        ("Eigenvalues in the complex plane", "eigenvalues.png", plot_eigenvalues, (6, 5.5)),
        ("Spectral masses vs depth", "masses.png", plot_masses, (7.5, 4.5)),
    ):
        fig, ax = plt.subplots(figsize=size)
        draw(profile, ax)
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=120)
        plt.close(fig)
        written[caption] = directory / filename
    return written
