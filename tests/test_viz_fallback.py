"""Explorers where no widget frontend renders them (nbval, plain nbconvert, GitHub's viewer, a notebook opened before
it runs): their output's text/plain is a line that says what the explorer shows and its first setting's numbers,
not ipywidgets' repr. And redraws after the first reuse its layout (atom_lab/viz.py, _live_figure)."""
import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import atom_lab  # noqa: E402
from atom_lab import viz  # noqa: E402
from atom_lab.analysis import keeper_sweeps  # noqa: E402

ipywidgets = pytest.importorskip("ipywidgets", reason="ipywidgets is a dependency; a bare GPU image may lack it")
TEXTS = [f"Fallback check {i}: tokens, channels and outliers {i * 7}." for i in range(10)]


@pytest.fixture(scope="module")
def tiny():
    model, tok = atom_lab.tiny_model("llama")
    return model, atom_lab.collect_stats(model, tok, TEXTS, n_tokens=128, seq_len=128, keep_tokens=96,
                                         progress=False)


@pytest.fixture
def shown(monkeypatch):
    """What the explorers display, captured instead of sent to a frontend."""
    out = []
    monkeypatch.setattr(viz, "_widgets", lambda: (ipywidgets, lambda obj, raw=False: out.append((obj, raw))))
    return out


def _text(shown):
    (bundle, raw), = shown
    assert raw and "application/vnd.jupyter.widget-view+json" in bundle  # widget frontends still get the widget
    return bundle["text/plain"]


def test_outlier_explorer_text(tiny, shown):
    _, stats = tiny
    viz.outlier_explorer(stats, "model.layers")
    text = _text(shown)
    key = "model.layers.0.self_attn.q_proj"
    peak = stats[key].samples[:64].abs().amax(0)
    top = atom_lab.reorder_index(stats[key])[-16:].flip(0)
    assert not text.startswith("VBox") and key in text and "tokens 0-64" in text
    assert f"max |x| {peak.max().item():.3g} in channel {int(peak.argmax())}" in text
    assert f"top 16 channels by the Hessian metric: {', '.join(str(int(c)) for c in top[:8])} and 8 more" in text


def test_keeper_explorer_text(tiny, shown):
    model, stats = tiny
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    sweeps = keeper_sweeps(model, stats, stats, names, [0, 16, 128], granularity="per-token", w_bits=None)
    viz.keeper_explorer(sweeps, stats)
    text = _text(shown)
    errs = {label: e[2] for label, (_, e) in sweeps[names[0]].items()}  # the slider starts at 128
    assert not text.startswith("VBox") and names[0] in text and "keeper 128" in text
    assert all(f"{label} {e:.4f} at 128" in text for label, e in errs.items())


def test_redraws_reuse_the_first_layout(tiny, shown):
    _, stats = tiny
    ui = viz.outlier_explorer(stats, "model.layers")
    module_w, layer_w = ui.children[0].children
    image = ui.children[2]
    first = image.value
    module_w.value = "down_proj"  # 640 channels instead of 256: other ticks, same layout
    assert image.value != first
    assert Image.open(io.BytesIO(image.value)).size == Image.open(io.BytesIO(first)).size
    assert viz._free_layout == [False]  # the flag never leaks into figures drawn outside an explorer
    assert viz.figure(4, 3).get_layout_engine() is not None


def test_explorer_rows_must_match_controls(shown):
    w = dict(a=ipywidgets.IntSlider(), b=ipywidgets.IntSlider())
    with pytest.raises(ValueError, match=r"rows=\[3\] must add up to the 2 controls"):
        viz.explorer(w, lambda a, b: None, "text", rows=[3])
    ui = viz.explorer(w, lambda a, b: None, "two sliders", rows=[1, 1])
    assert [len(h.children) for h in ui.children[:2]] == [1, 1] and _text(shown) == "two sliders"
