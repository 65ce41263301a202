"""Error analysis on hand-computable tensors, on tiny models, and its bad-input errors."""
import pytest
import torch

import atom_lab
from atom_lab.analysis import (atom_row_bytes, average_sweeps, bytes_table, fake_quantize, keeper_sweep, keeper_sweeps,
                               layer_error, matmul_error, outlier_consistency, outlier_table, relative_error,
                               valid_keepers)
from atom_lab.kernels import quantize_atom_ref
from atom_lab.quantizers import fake_quantize_symmetric


def test_per_token_vs_per_group_by_hand():
    x = torch.tensor([[1.0, 2, 3, 7, 14, 28, -49, 7]])
    # per-token INT4: scale = 49/7 = 7, so the small values all round to 0 or 1
    assert fake_quantize(x, 4, "per-token").tolist() == [[0.0, 0, 0, 7, 14, 28, -49, 7]]
    # groups of 4: scales 1 and 7, every value is a multiple of its scale: lossless
    assert torch.equal(fake_quantize(x, 4, "per-group", group_size=4), x)
    # the analysis helpers call the project's quantizer, they do not bring their own
    assert torch.equal(fake_quantize(x, 4, "per-group", group_size=4), fake_quantize_symmetric(x, 4, 4))


def test_keeper_channels_by_hand():
    x = torch.tensor([[7.0, 14, -21, 700]])
    assert fake_quantize(x, 4, "per-token").tolist() == [[0.0, 0, 0, 700]]
    # keeper=1: [7, 14, -21] gets scale 3 -> q = [2, 5, -7]; 700 goes to INT8 with scale fp16(700/127) -> q = 127
    out = fake_quantize(x, 4, "per-token", keeper=1)
    s8 = torch.tensor(700 / 127).half().float()
    assert out[0, :3].tolist() == [6.0, 15.0, -21.0] and out[0, 3] == 127 * s8


def test_per_channel_and_per_tensor_by_hand():
    x = torch.tensor([[2.0, 70], [14, -21]])
    # activations per input channel: scales 2 and 10 -> [[2, 70], [14, -20]]
    assert fake_quantize(x, 4, "per-channel").tolist() == [[2.0, 70], [14, -20]]
    # weights per channel = per output row: scales 10 and 3 -> [[0, 70], [15, -21]]
    assert fake_quantize(x, 4, "per-channel", weight=True).tolist() == [[0.0, 70], [15, -21]]
    # per tensor: one scale 10 -> [[0, 70], [10, -20]]
    assert fake_quantize(x, 4, "per-tensor").tolist() == [[0.0, 70], [10, -20]]


def test_matmul_error_is_zero_when_everything_is_representable():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (6, 32), generator=g).float()
    w = torch.randint(-127, 128, (5, 32), generator=g).float()
    x[:, 0], w[:, 0] = 127, 127  # every row's max is 127: INT8 scale 1, lossless
    assert matmul_error(x, w, keeper=32) == 0.0
    assert matmul_error(x, w, a_bits=8, w_bits=8, granularity="per-token") == 0.0
    assert matmul_error(x, w, a_bits=None, w_bits=None) == 0.0
    assert matmul_error(x, w, a_bits=4, w_bits=None, granularity="per-token") > 0.05
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])) == 5.0


def test_keepers_fix_a_toy_outlier_channel():
    """Toy data (not a model): one channel 100x larger; keeping it at INT8 after reordering removes most error."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    x[:, 17] *= 100
    idx = atom_lab.reorder_index(x.pow(2).mean(0))
    assert idx[-1] == 17
    errs = keeper_sweep(x, w, [0, 1, 8], idx, granularity="per-token", w_bits=None)
    assert errs[1] < errs[0] / 5 and errs[2] < errs[0] / 5
    # without reordering the "kept" channel is channel 127, not the outlier: no gain
    assert matmul_error(x, w, keeper=1, granularity="per-token", w_bits=None) > errs[0] * 0.9


def test_layer_error_on_tiny_models(tiny):
    arch, model, tok = tiny
    texts = [f"Sample text {i} for a tiny model, with some numbers {i * 31}." for i in range(8)]
    stats = atom_lab.collect_stats(model, tok, texts, n_tokens=256, seq_len=128, keep_tokens=128, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    s = stats[name]
    idx = atom_lab.reorder_index(s)
    base = layer_error(model, stats, name, granularity="per-token", keeper=0)
    kept = layer_error(model, stats, name, granularity="per-token", keeper=64)
    assert kept == matmul_error(s.samples, model.get_submodule(name).weight, granularity="per-token", keeper=64,
                                index=idx)
    assert kept < base / 2, arch
    assert layer_error(model, stats, name, granularity="per-tensor") > base
    assert layer_error(model, stats, name, metric=None, granularity="per-token", keeper=64) > kept
    assert outlier_consistency(s.samples, atom_lab.outlier_channels(s, 4)) > 0.9
    table = outlier_table(stats, "model.layers")
    assert len(table) == 16 and set(table.module) >= {"q_proj", "down_proj", "residual"}


def test_bytes_match_the_packed_format():
    x = torch.randn(3, 576)
    for keeper, G in [(128, 64), (64, 128), (0, 64)]:
        packed = quantize_atom_ref(x, G, keeper)
        extra = 2 if keeper == 0 else 0  # the packed format keeps a dummy fp16 scale when there is no INT8 part
        assert packed.nbytes() == 3 * (atom_row_bytes(576, keeper, G) + extra)
    t = bytes_table([("q_proj", 576, 576)], [0, 128], 64)
    assert t.bits_per_weight.tolist() == [4.25, 8 * (448 / 2 + 7 * 2 + 128 + 2) / 576]


def test_valid_keepers():
    assert valid_keepers(576, 64, "per-group") == [0, 64, 128, 192, 256]
    assert valid_keepers(576, None, "per-token", step=64) == [0, 64, 128, 192, 256]
    assert valid_keepers(100, None, "per-token", upto=256, step=50) == [0, 50]


def test_bad_settings_are_clear_errors():
    x, w = torch.randn(4, 576), torch.randn(8, 576)
    with pytest.raises(ValueError, match="keeper=600 is larger than the channel count 576; choose keeper <= 576"):
        matmul_error(x, w, keeper=600)
    with pytest.raises(ValueError, match="group_size=128 must divide the 448 non-keeper channels.*keeper=128"):
        matmul_error(x, w, keeper=128, group_size=128)
    with pytest.raises(ValueError, match="granularity='per-row' is unknown"):
        fake_quantize(x, granularity="per-row")
    with pytest.raises(ValueError, match="must be 2-D tensors sharing K"):
        matmul_error(x, w[:, :512])
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(torch.tensor([[1.0, float("nan")]]), granularity="per-token")
    with pytest.raises(ValueError, match="x is empty"):
        fake_quantize(torch.zeros(0, 8), granularity="per-token")
    with pytest.raises(ValueError, match="keeper=600 is larger"):
        atom_row_bytes(576, 600, 64)
    with pytest.raises(ValueError, match="bits must be an int in"):
        fake_quantize(x, bits=1, granularity="per-token")


def test_layer_error_bad_names():
    model, tok = atom_lab.tiny_model("llama", num_hidden_layers=1)
    stats = atom_lab.collect_stats(model, tok, ["x" * 100], n_tokens=64, seq_len=64, progress=False)
    with pytest.raises(KeyError, match="has no statistics"):
        layer_error(model, stats, "model.layers.5.mlp.down_proj")
    with pytest.raises(TypeError, match="not an nn.Linear"):
        layer_error(model, stats, "model.layers.0.residual")
    with pytest.raises(ValueError, match="keeper=700 is larger than the channel count 256"):
        layer_error(model, stats, "model.layers.0.self_attn.q_proj", keeper=700)


def test_keeper_sweeps_and_average():
    model, tok = atom_lab.tiny_model("qwen2")
    texts = [f"Calibration sentence {i} with digits {i * 97}." for i in range(10)]
    calib = atom_lab.collect_stats(model, tok, texts, n_tokens=256, seq_len=128, progress=False)
    held = atom_lab.collect_stats(model, tok, texts[::-1], n_tokens=128, seq_len=128, progress=False)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    sweeps = keeper_sweeps(model, calib, held, names, [0, 64, 128], granularity="per-token", w_bits=None)
    assert set(sweeps) == set(names) and set(sweeps[names[0]]) == {"hessian", "max", "none"}
    ks, errs = sweeps[names[1]]["hessian"]
    idx = atom_lab.reorder_index(calib[names[1]])
    w = model.get_submodule(names[1]).weight
    assert ks == [0, 64, 128] and errs[1] == matmul_error(held[names[1]].samples, w, w_bits=None,
                                                          granularity="per-token", keeper=64, index=idx)
    assert errs[1] < errs[0]  # the tiny models' scaled norm channels are real outliers
    avg = average_sweeps(sweeps)
    assert set(avg) == {"q_proj", "down_proj"}
    want = (sweeps[names[0]]["max"][1][2] + sweeps[names[1]]["max"][1][2]) / 2
    assert avg["q_proj"]["max"][1][2] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="ordering 'random' is unknown"):
        keeper_sweeps(model, calib, held, names[:1], [0], orderings=("random",))
    with pytest.raises(KeyError, match="missing from the statistics"):
        keeper_sweeps(model, calib, held, ["model.layers.0.mlp"], [0])
