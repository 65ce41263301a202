"""Figures and interactive explorers for the outlier and reordering chapters.

Every figure function returns a matplotlib Figure built without pyplot's global state (so notebooks show it once
and explorers can redraw without leaking figures). Palettes are colorblind-safe (seaborn "colorblind", viridis /
magma colour maps). Explorers take precomputed data, so a redraw is only drawing: well under a second on a CPU.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure

from atom_lab.reorder import reorder_index
from atom_lab.stats import ChannelStats, layer_index, module_kind

PALETTE = sns.color_palette("colorblind")
DPI = 90
ERROR_LABEL = r"relative output error $\|\hat Y - Y\|_F / \|Y\|_F$"
# What each hooked input is, for titles: k/v read the same tensor as q, up the same as gate.
INPUT_OF = {"q_proj": "q/k/v_proj input (after input RMSNorm)", "k_proj": "q/k/v_proj input",
            "v_proj": "q/k/v_proj input", "o_proj": "o_proj input (attention output)",
            "gate_proj": "gate/up_proj input (after post-attention RMSNorm)", "up_proj": "gate/up_proj input",
            "down_proj": "down_proj input (SiLU(gate) * up)", "residual": "residual stream (block input)"}


def _show_figures_inline() -> None:
    """In Jupyter, register the inline formatter for Figure objects: without pyplot, ipykernel only does so once a
    pyplot figure exists, and the Figures returned here would print as text."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    backend = matplotlib.get_backend()
    if shell is not None and "inline" in backend:
        from matplotlib_inline.backend_inline import configure_inline_support
        configure_inline_support(shell, backend)


_show_figures_inline()


# Explorer redraws set this: their axes get the positions of the first drawing, no layout engine (see _live_figure).
_free_layout = [False]


def _figure(w: float, h: float, **kw) -> Figure:
    return Figure(figsize=(w, h), dpi=DPI, layout=None if _free_layout[0] else "constrained", **kw)


def by_layer(stats: Mapping[str, ChannelStats], blocks_name: str, module: str) -> dict[int, str]:
    """{layer number: stats key} for one module kind (e.g. "down_proj" or "residual")."""
    out = {layer_index(k, blocks_name): k for k in stats if module_kind(k) == module}
    if not out:
        kinds = sorted({module_kind(k) for k in stats})
        raise ValueError(f"module={module!r} has no statistics; choose one of {', '.join(kinds)}.")
    return dict(sorted(out.items()))


def outlier_ratio_by_layer(table, modules: Sequence[str] | None = None) -> Figure:
    """Outlier ratio (max over median channel max|x|) per layer, one line per module kind, log scale.
    table: analysis.outlier_table(...) (pandas DataFrame with columns layer, module, ratio)."""
    modules = list(modules or dict.fromkeys(table.module))
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    for i, m in enumerate(modules):
        t = table[table.module == m].sort_values("layer")
        ax.plot(t.layer, t.ratio, marker="o", ms=3, lw=1.5, color=PALETTE[i % len(PALETTE)], label=m)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max|x| of worst channel / median channel")
    ax.set_title("How extreme the outlier channels are, per layer and input")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(ncol=4, fontsize=8, frameon=False)
    return fig


def channel_heatmap(stats: Mapping[str, ChannelStats], blocks_name: str, module: str = "q_proj",
                    statistic: str = "max_abs", max_cols: int = 320) -> Figure:
    """Per-layer channel magnitudes: rows = layers, columns = input channels, colour = log10 of the statistic.

    statistic: "max_abs", "mean_sq" or "mean_abs" (a ChannelStats field). More than max_cols channels are
    max-pooled into blocks (said in the axis label) so a single outlier channel stays visible."""
    if statistic not in ("max_abs", "mean_sq", "mean_abs"):
        raise ValueError(f"statistic={statistic!r} is unknown; use 'max_abs', 'mean_sq' or 'mean_abs'.")
    keys = by_layer(stats, blocks_name, module)
    grid = torch.stack([getattr(stats[k], statistic) for k in keys.values()]).clamp_min(1e-8).log10().numpy()
    C = grid.shape[1]
    # A screen has fewer pixels than a layer has channels: max-pool so single-channel spikes are not skipped.
    grid, _, fc = _pool_max(grid, grid.shape[0], max_cols)
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    # The colour range starts at the 1st percentile: a few near-zero channels would otherwise wash out the rest.
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest", vmin=float(np.percentile(grid, 1)),
                   vmax=float(grid.max()), extent=(-0.5, C - 0.5, max(keys) + 0.5, min(keys) - 0.5))
    label = {"max_abs": "max |x|", "mean_sq": "mean x²", "mean_abs": "mean |x|"}[statistic]
    fig.colorbar(im, ax=ax, label=f"log10 {label}")
    ax.set_xlabel("input channel" + (f" (max over blocks of {fc})" if fc > 1 else ""))
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{label} per channel: {INPUT_OF.get(module, module)}")
    return fig


def _pool_max(a: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int, int]:
    """Max-pool a 2-D array to at most rows x cols, so a downsampled picture keeps its outliers."""
    fr, fc = -(-a.shape[0] // rows), -(-a.shape[1] // cols)
    pr, pc = -a.shape[0] % fr, -a.shape[1] % fc
    a = np.pad(a, ((0, pr), (0, pc)), constant_values=a.min())  # padding must never win a block's max
    return a.reshape(a.shape[0] // fr, fr, a.shape[1] // fc, fc).max(axis=(1, 3)), fr, fc


def activation_surface(samples: torch.Tensor, title: str, max_tokens: int = 128, max_cols: int = 192) -> Figure:
    """3-D surface of |x| over tokens x channels (the picture of the SmoothQuant and Atom papers).

    samples: float [T, C] (ChannelStats.samples). Larger grids are max-pooled to max_tokens x max_cols cells so
    the spikes survive downsampling (said in the axis label)."""
    a = samples[:max_tokens].abs().float().numpy()
    z, _, fc = _pool_max(a, max_tokens, max_cols)
    C, T = np.meshgrid(np.arange(z.shape[1]) * fc, np.arange(z.shape[0]))
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(C, T, z, cmap="viridis", rcount=z.shape[0], ccount=z.shape[1], linewidth=0, antialiased=False)
    ax.set_xlabel("channel" + (f" (max over {fc})" if fc > 1 else ""))
    ax.set_ylabel("token")
    ax.set_zlabel("|x|", labelpad=8)
    ax.locator_params(axis="z", nbins=5)
    ax.view_init(elev=28, azim=-58)
    ax.set_title(title, fontsize=10)
    return fig


def magnitude_distributions(x: torch.Tensor, weight: torch.Tensor, title: str) -> Figure:
    """Weights are flat, activations are spiky: per-input-channel max |.| of both, and histograms of |values|.

    x: float activation [T, K]; weight: float [N, K] (the layer that reads x)."""
    xa, wa = x.abs().float(), weight.detach().abs().float().cpu()
    fig = _figure(10, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(xa.amax(0).numpy(), lw=1, color=PALETTE[0], label="activation: max over tokens")
    ax1.plot(wa.amax(0).numpy(), lw=1, color=PALETTE[1], label="weight: max over output rows")
    ax1.set_yscale("log")
    ax1.set_xlabel("input channel")
    ax1.set_ylabel("max |value|")
    ax1.set_title("per input channel")
    ax1.legend(fontsize=8, frameon=False)
    lo = max(1e-6, float(min(xa[xa > 0].min(), wa[wa > 0].min())))
    hi = float(max(xa.max(), wa.max()))
    bins = np.logspace(np.log10(lo), np.log10(hi), 80)
    ax2.hist(xa.flatten().numpy(), bins=bins, density=False, histtype="step", lw=1.5, color=PALETTE[0],
             weights=np.full(xa.numel(), 1 / xa.numel()), label="activation")
    ax2.hist(wa.flatten().numpy(), bins=bins, density=False, histtype="step", lw=1.5, color=PALETTE[1],
             weights=np.full(wa.numel(), 1 / wa.numel()), label="weight")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("|value|")
    ax2.set_ylabel("fraction of values")
    ax2.set_title("distribution of magnitudes")
    ax2.legend(fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def granularity_errors(table, title: str) -> Figure:
    """Bar chart of relative output error per module kind and granularity.
    table: pandas DataFrame with columns module, granularity, error."""
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    sns.barplot(data=table, x="module", y="error", hue="granularity", palette="colorblind", ax=ax, errorbar=None)
    ax.set_xlabel("layer input")
    ax.set_ylabel(ERROR_LABEL)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="one INT4 scale", fontsize=8, title_fontsize=8, frameon=False, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    return fig


_ORDER_STYLE = {"hessian": dict(color=PALETTE[0], marker="o", ls="-"),
                "max": dict(color=PALETTE[1], marker="s", ls="--"),
                "none": dict(color=PALETTE[7], marker="^", ls=":")}


def keeper_error_plot(panels: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]],
                      title: str, marker_at: int | None = None) -> Figure:
    """Output error vs number of INT8 keeper channels, one panel per layer input, one curve per ordering.

    panels: {panel title: {curve label: (keepers, errors)}}; labels "hessian", "max", "none" get fixed styles.
    marker_at: draw a vertical line at this keeper count (e.g. Atom's 128)."""
    n = len(panels)
    fig = _figure(3.1 * n + 0.6, 3.3)
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    for ax, (ptitle, curves) in zip(axes, panels.items()):
        for i, (label, (ks, errs)) in enumerate(curves.items()):
            style = _ORDER_STYLE.get(label, dict(color=PALETTE[(i + 2) % len(PALETTE)], marker="d", ls="-"))
            ax.plot(list(ks), list(errs), ms=4, lw=1.5, label=label, **style)
        if marker_at is not None:
            ax.axvline(marker_at, color="0.6", lw=1, ls="-.")
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("INT8 keeper channels")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ERROR_LABEL)
    axes[0].legend(title="channel order", fontsize=8, title_fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def bits_per_weight_plot(table) -> Figure:
    """Average bits per weight vs keeper count, one line per layer shape.
    table: analysis.bytes_table(...) (columns name, keeper, bits_per_weight)."""
    fig = _figure(5.5, 3.3)
    ax = fig.add_subplot()
    for i, (name, t) in enumerate(table.groupby("name", sort=False)):
        ax.plot(t.keeper, t.bits_per_weight, marker="o", ms=4, color=PALETTE[i % len(PALETTE)], label=name)
    ax.axhline(16, color="0.5", lw=1, ls=":")
    ax.set_xlabel("INT8 keeper channels")
    ax.set_ylabel("bits per weight (incl. fp16 scales)")
    ax.set_title("Storage cost of mixed precision")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


# ---- interactive explorers ---------------------------------------------------------------------------------------

def _widgets():
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError as e:  # pragma: no cover - ipywidgets is a dependency
        raise ImportError("The explorers need ipywidgets: pip install ipywidgets") from e
    return ipywidgets, display


def figure(w: float, h: float, **kw) -> Figure:
    """A Figure of w x h inches in the course's style (constrained layout, no pyplot state); for notebooks'
    own explorer drawings (notebook 03), so that `explorer` can freeze their layout like the ones here."""
    return _figure(w, h, **kw)


def _live_figure(widgets, controls: dict, draw):
    """An Image widget redrawn as PNG whenever a control changes: draw(**values) -> Figure (None: keep the image).

    A plain Image (no Output widget capturing display calls) keeps headless runs (nbval, nbconvert) simple and
    works the same in JupyterLab, Notebook and Colab. Speed: the first drawing is laid out by matplotlib's
    constrained layout; later drawings of the same shape reuse its axes positions instead of solving the layout
    again, which halves a redraw's CPU time (0.7 -> 0.4 s for notebook 01's explorer on a shared 2-core CPU; the
    issue's bar is 1 s). Same shape = same number of axes; anything else is laid out afresh."""
    image = widgets.Image(format="png")
    frozen = {}

    def redraw(_change=None):
        values = {k: w.value for k, w in controls.items()}
        _free_layout[0] = bool(frozen)
        try:
            fig = draw(**values)
        finally:
            _free_layout[0] = False
        if fig is None:
            return
        boxes = frozen.get(len(fig.axes))
        if frozen and boxes is None:  # a drawing of a new shape: draw it again, laid out
            fig = draw(**values)
        for ax, box in zip(fig.axes, boxes or []):
            ax.set_position(box)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        if boxes is None:  # positions are final only after a draw
            frozen[len(fig.axes)] = [ax.get_position() for ax in fig.axes]
        image.value = buf.getvalue()

    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return image


def explorer(controls: Mapping[str, object], draw, text: str, rows: Sequence[int] | None = None):
    """Show controls (ipywidgets, by draw's argument names) above a figure that redraws when one changes.

    draw(**values) -> Figure (from `figure`, not pyplot) or None. text: one line that stands in for the explorer
    where no widget frontend renders it (nbval, plain nbconvert, GitHub's viewer, the saved notebook before it
    runs): say what the explorer shows and its first setting's key numbers. rows: how many controls per row
    (default: all in one row). Returns the VBox (already displayed)."""
    widgets, display = _widgets()
    ctl = list(controls.values())
    rows = list(rows or [len(ctl)])
    if sum(rows) != len(ctl):
        raise ValueError(f"rows={rows} must add up to the {len(ctl)} controls.")
    image = _live_figure(widgets, dict(controls), draw)
    starts = np.cumsum([0] + rows)
    ui = widgets.VBox([widgets.HBox(ctl[a:b]) for a, b in zip(starts, starts[1:])] + [image])
    _display_explorer(display, ui, text)
    return ui


def _display_explorer(display, ui, text: str) -> None:
    """Display an explorer so that it reads well where no widget frontend renders it.

    The output carries the widget view (JupyterLab, Notebook and Colab draw the live controls from it) and, as its
    text/plain part, `text` instead of ipywidgets' repr (`VBox(children=(HBox(children=(Dropdown(...`)."""
    bundle = dict(ui._repr_mimebundle_())
    bundle["text/plain"] = text
    display(bundle, raw=True)


def _channels(ch: Sequence[int], most: int = 8) -> str:
    ch = [int(c) for c in ch]
    return ", ".join(map(str, ch[:most])) + (f" and {len(ch) - most} more" if len(ch) > most else "")


def draw_tokens(stats: ChannelStats, title: str, tokens: tuple[int, int] = (0, 64), keeper: int = 16,
                metric: str = "hessian", index: torch.Tensor | None = None) -> Figure:
    """|x| over a token range (heatmap) and per-channel max over those tokens, with the top `keeper` channels
    (by metric over ALL calibration tokens) marked: the same channels light up for every token."""
    lo, hi = tokens
    x = stats.samples[lo:hi].abs()
    if x.shape[0] == 0:
        raise ValueError(f"tokens={tokens} selects no rows; stats.samples holds {stats.samples.shape[0]} tokens.")
    index = reorder_index(stats, metric) if index is None else index
    top = index[index.numel() - keeper:] if keeper else index[:0]
    fig = _figure(9, 4.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    # Max-pool wide layers (down_proj: 1536 channels) so a single outlier channel is not skipped on screen.
    heat, _, fc = _pool_max(x.clamp_min(1e-4).log10().numpy(), x.shape[0], 400)
    im = ax1.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest",
                    extent=(-0.5, x.shape[1] - 0.5, lo + x.shape[0] - 0.5, lo - 0.5))
    fig.colorbar(im, ax=ax1, label="log10 |x|" + (f", max over {fc} channels" if fc > 1 else ""), pad=0.01)
    ax1.set_ylabel("token")
    ax1.set_title(title, fontsize=10)
    m = x.amax(0)
    ax2.plot(m.numpy(), lw=0.8, color=PALETTE[0], label="max |x| over these tokens")
    if keeper:
        ax2.plot(top.numpy(), m[top].numpy(), "o", ms=4, mfc="none", color=PALETTE[3],
                 label=f"top {keeper} channels by {metric} (calibration)")
    ax2.set_yscale("log")
    ax2.set_xlabel("input channel")
    ax2.set_ylabel("max |x|")
    # Below the figure, not on the axes: spikes reach the top of this panel anywhere along the channels.
    fig.legend(*ax2.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def outlier_explorer(stats: Mapping[str, ChannelStats], blocks_name: str, keepers: int = 256):
    """Choose a layer input, a decoder layer, a token range and a keeper count; redraws draw_tokens.
    The reorder indices are computed up front, so a redraw is only drawing."""
    widgets, _ = _widgets()
    modules = list(dict.fromkeys(module_kind(k) for k in stats))
    layers = {m: by_layer(stats, blocks_name, m) for m in modules}
    index = {k: reorder_index(s) for k, s in stats.items()}
    T = min(s.samples.shape[0] for s in stats.values())
    first = next(iter(layers[modules[0]]))
    module_w = widgets.Dropdown(options=modules, value=modules[0], description="input of")
    layer_w = widgets.IntSlider(value=first, min=min(layers[modules[0]]), max=max(layers[modules[0]]),
                                description="layer", continuous_update=False)
    tokens_w = widgets.IntRangeSlider(value=(0, min(64, T)), min=0, max=T, step=1, description="tokens",
                                      continuous_update=False)
    keeper_w = widgets.IntSlider(value=16, min=0, max=keepers, step=8, description="keeper",
                                 continuous_update=False)

    def draw(module, layer, tokens, keeper):
        if layer not in layers[module]:
            return None
        key = layers[module][layer]
        if tokens[1] <= tokens[0]:
            tokens = (tokens[0], tokens[0] + 1)
        return draw_tokens(stats[key], f"{key}: {INPUT_OF.get(module, module)}", tokens,
                           min(keeper, stats[key].channels), index=index[key])

    key, (lo, hi), k = layers[module_w.value][layer_w.value], tokens_w.value, keeper_w.value
    top = index[key][index[key].numel() - k:].flip(0) if k else index[key][:0]
    peak = stats[key].samples[lo:hi].abs().amax(0)
    text = (f"[outlier explorer, shown live in JupyterLab / Colab once the notebook runs; its first setting: {key}, "
            f"tokens {lo}-{hi}: max |x| {peak.max().item():.3g} in channel {int(peak.argmax())}, median channel "
            f"{peak.median().item():.3g}; top {k} channels by the Hessian metric: {_channels(top)}]")
    return explorer(dict(module=module_w, layer=layer_w, tokens=tokens_w, keeper=keeper_w), draw, text, rows=(2, 2))


def draw_keeper(sweep: Mapping[str, tuple[Sequence[int], Sequence[float]]], scores: torch.Tensor, keeper: int,
                title: str) -> Figure:
    """Left: error vs keeper curves with the chosen keeper marked. Right: the sorted Hessian scores, with the
    channels that `keeper` sends to INT8 shaded."""
    fig = _figure(10, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    for label, (ks, errs) in sweep.items():
        style = _ORDER_STYLE.get(label, dict(color=PALETTE[4], marker="d", ls="-"))
        ax1.plot(list(ks), list(errs), ms=4, lw=1.5, label=label, **style)
        ks_arr = np.asarray(ks)
        j = int(np.abs(ks_arr - keeper).argmin())
        ax1.plot([ks_arr[j]], [errs[j]], "o", ms=9, mfc="none", color="k")
    ax1.axvline(keeper, color="0.6", lw=1, ls="-.")
    ax1.set_xlabel("INT8 keeper channels")
    ax1.set_ylabel(ERROR_LABEL)
    ax1.grid(True, alpha=0.3)
    ax1.legend(title="channel order", fontsize=8, title_fontsize=8, frameon=False)
    s = torch.sort(scores.float()).values.numpy()
    C = s.size
    ax2.plot(np.arange(C), s, color=PALETTE[0], lw=1.2)
    if keeper:
        ax2.axvspan(C - keeper - 0.5, C - 0.5, color=PALETTE[3], alpha=0.25, label=f"INT8 ({keeper} channels)")
        ax2.legend(fontsize=8, frameon=False, loc="upper left")
    ax2.set_yscale("log")
    ax2.set_xlabel("position after reordering (ascending)")
    ax2.set_ylabel("mean x² (Hessian diagonal)")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig


def keeper_explorer(sweeps: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]],
                    stats: Mapping[str, ChannelStats], max_keeper: int = 256):
    """Pick a layer (among the precomputed sweeps) and a keeper count; redraws draw_keeper.

    sweeps: {stats key: {ordering label: (keepers, errors)}}, computed beforehand (e.g. with
    analysis.keeper_sweep), so a redraw only draws."""
    widgets, _ = _widgets()
    names = list(sweeps)
    name_w = widgets.Dropdown(options=names, value=names[0], description="layer", layout=dict(width="420px"))
    keeper_w = widgets.IntSlider(value=128, min=0, max=max_keeper, step=16, description="keeper",
                                 continuous_update=False)

    def draw(name, keeper):
        return draw_keeper(sweeps[name], stats[name].mean_sq, min(keeper, stats[name].channels),
                           f"{name}: {INPUT_OF.get(module_kind(name), '')}")

    name, k = name_w.value, keeper_w.value
    errors = []
    for label, (ks, errs) in sweeps[name].items():
        j = int(np.abs(np.asarray(ks) - k).argmin())  # the measured keeper count nearest the slider's
        errors.append(f"{label} {float(errs[j]):.4f} at {int(ks[j])}")
    text = (f"[keeper explorer, shown live in JupyterLab / Colab once the notebook runs; its first setting: {name}, "
            f"keeper {k}: relative output error by channel order: {'; '.join(errors)}]")
    return explorer(dict(name=name_w, keeper=keeper_w), draw, text)

