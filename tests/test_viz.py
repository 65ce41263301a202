"""Figures return labelled matplotlib Figures; explorers build and redraw headless; bad input is a clear error."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import atom_lab  # noqa: E402
from atom_lab import viz  # noqa: E402
from atom_lab.analysis import average_sweeps, bytes_table, keeper_sweeps, outlier_table  # noqa: E402

TEXTS = [f"Visual check {i}: tokens, channels and outliers {i * 13}." for i in range(10)]


@pytest.fixture(scope="module")
def tiny_stats():
    model, tok = atom_lab.tiny_model("llama")
    return model, atom_lab.collect_stats(model, tok, TEXTS, n_tokens=128, seq_len=128, keep_tokens=96,
                                         progress=False)


def _labelled(fig):
    assert isinstance(fig, Figure)
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    # every panel names its y axis; x labels may be shared by stacked panels
    assert axes and all(a.get_ylabel() for a in axes if a.has_data()) and any(a.get_xlabel() for a in axes)
    assert any(a.get_title() for a in axes) or fig._suptitle is not None
    return fig


def test_figures(tiny_stats):
    model, stats = tiny_stats
    q = "model.layers.1.self_attn.q_proj"
    _labelled(viz.outlier_ratio_by_layer(outlier_table(stats, "model.layers"), ["residual", "q_proj", "down_proj"]))
    fig = _labelled(viz.channel_heatmap(stats, "model.layers", "down_proj"))
    assert fig.axes[0].images[0].get_array().shape == (2, 320)  # layers x channels, max-pooled by 2
    assert "max over blocks of 2" in fig.axes[0].get_xlabel()
    fig = viz.channel_heatmap(stats, "model.layers", "q_proj")
    assert fig.axes[0].images[0].get_array().shape == (2, 256)
    _labelled(viz.activation_surface(stats[q].samples, "q_proj input"))
    _labelled(viz.magnitude_distributions(stats[q].samples, model.get_submodule(q).weight, "q_proj"))
    sweeps = keeper_sweeps(model, stats, stats, [q], [0, 64], granularity="per-token", w_bits=None)
    _labelled(viz.keeper_error_plot(average_sweeps(sweeps), "error vs keeper", marker_at=128))
    _labelled(viz.bits_per_weight_plot(bytes_table([("q", 256, 256)], [0, 64, 128], 64)))
    _labelled(viz.draw_tokens(stats[q], "tokens", (0, 32), keeper=4))
    _labelled(viz.draw_keeper(sweeps[q], stats[q].mean_sq, 64, "keeper"))
    import pandas as pd
    table = pd.DataFrame(dict(module=["q_proj", "q_proj"], granularity=["per-token", "per-group"], error=[0.3, 0.1]))
    _labelled(viz.granularity_errors(table, "granularity"))


def test_surface_pooling_keeps_the_outlier():
    a = torch.zeros(300, 1000)
    a[7, 555] = -42.0
    fig = viz.activation_surface(a, "one spike", max_tokens=64, max_cols=100)
    assert 42.0 <= fig.axes[0].get_zlim()[1] < 50  # the spike's height survives downsampling
    pooled, fr, fc = viz._pool_max(a.abs().numpy(), 64, 100)
    assert pooled.shape == (60, 100) and (fr, fc) == (5, 10) and pooled.max() == 42.0 and pooled.sum() == 42.0
    neg, _, _ = viz._pool_max(-torch.arange(1.0, 8.0).reshape(1, 7).numpy(), 1, 3)  # 7 columns -> 3 blocks
    assert neg.tolist() == [[-1.0, -4.0, -7.0]]  # the padded last block keeps its own max


def test_explorers_build_and_redraw_headless(tiny_stats):
    pytest.importorskip("ipywidgets", reason="ipywidgets is a dependency; a bare GPU image may lack it")
    model, stats = tiny_stats
    ui = viz.outlier_explorer(stats, "model.layers")
    module_w, layer_w = ui.children[0].children
    tokens_w, keeper_w = ui.children[1].children
    image = ui.children[2]
    seen = [image.value]
    for w, v in [(module_w, "down_proj"), (layer_w, 1), (tokens_w, (10, 40)), (keeper_w, 64)]:
        w.value = v
        assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and image.value not in seen  # a new drawing each time
        seen.append(image.value)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    sweeps = keeper_sweeps(model, stats, stats, names, [0, 16, 32], granularity="per-token", w_bits=None)
    ui2 = viz.keeper_explorer(sweeps, stats)
    name_w, keeper_w2 = ui2.children[0].children
    first = ui2.children[1].value
    name_w.value, keeper_w2.value = names[1], 32
    assert ui2.children[1].value != first


def test_bad_input(tiny_stats):
    _, stats = tiny_stats
    with pytest.raises(ValueError, match="module='lm_head' has no statistics; choose one of"):
        viz.channel_heatmap(stats, "model.layers", "lm_head")
    with pytest.raises(ValueError, match="statistic='median' is unknown"):
        viz.channel_heatmap(stats, "model.layers", "q_proj", statistic="median")
    with pytest.raises(ValueError, match="selects no rows"):
        viz.draw_tokens(stats["model.layers.0.residual"], "t", tokens=(500, 600))
