"""reorder_index ordering, ties and errors; reordering a layer leaves its output unchanged."""
import pytest
import torch

import atom_lab
from atom_lab.reorder import (check_keeper, inverse_permutation, outlier_channels, reorder_activation, reorder_index,
                              reorder_linear)
from atom_lab.stats import ChannelStats


def _stats(max_abs, mean_sq):
    max_abs, mean_sq = torch.tensor(max_abs), torch.tensor(mean_sq)
    return ChannelStats(max_abs=max_abs, mean_sq=mean_sq, mean_abs=mean_sq.sqrt(), n_tokens=1,
                        samples=torch.zeros(0, max_abs.numel()))


def test_outliers_last():
    assert reorder_index(torch.tensor([3.0, 1.0, 2.0, 10.0])).tolist() == [1, 2, 0, 3]


def test_ties_keep_channel_order():
    assert reorder_index(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])).tolist() == [2, 4, 0, 1, 3]
    assert reorder_index(torch.full((1000,), 0.25)).tolist() == list(range(1000))  # constant channels
    assert reorder_index(torch.zeros(7)).tolist() == list(range(7))


def test_metric_chooses_the_statistic():
    # channel 0: one spike (large max, small mean square); channel 2: large everywhere (large mean square)
    s = _stats(max_abs=[100.0, 1.0, 20.0], mean_sq=[4.0, 1.0, 300.0])
    assert reorder_index(s, "hessian").tolist() == [1, 0, 2]
    assert reorder_index(s, "max").tolist() == [1, 2, 0]
    assert outlier_channels(s, 1, "max").tolist() == [0]
    assert outlier_channels(s, 2).tolist() == [0, 2]
    assert outlier_channels(s, 0).tolist() == []


def test_bad_scores_are_clear_errors():
    with pytest.raises(ValueError, match="metric='l2' is unknown.*'hessian'.*'max'"):
        reorder_index(torch.ones(3), metric="l2")
    with pytest.raises(ValueError, match="empty"):
        reorder_index(torch.ones(0))
    with pytest.raises(ValueError, match=r"NaN \(channels \[1\]"):
        reorder_index(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="1-D float tensor"):
        reorder_index(torch.ones(2, 3))
    with pytest.raises(TypeError, match="ChannelStats or a 1-D float tensor"):
        reorder_index([1.0, 2.0])


def test_keeper_larger_than_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="keeper=300 is larger than the channel count 256; choose keeper <= 256"):
        outlier_channels(torch.rand(256), 300)
    with pytest.raises(ValueError, match="keeper must be an int >= 0"):
        check_keeper(-1, 10)


def test_reorder_is_exact_on_integer_data():
    """Integer values with small sums are exact in float32 in any order, so the output must match bit for bit."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-8, 9, (40, 96), generator=g).float())
        lin.bias.copy_(torch.randint(-8, 9, (40,), generator=g).float())
    x = torch.randint(-50, 51, (5, 7, 96), generator=g).float()
    idx = reorder_index(x.abs().amax((0, 1)) + torch.rand(96, generator=g))
    assert not torch.equal(idx, torch.arange(96))
    new = reorder_linear(lin, idx)
    assert torch.equal(new(reorder_activation(x, idx)), lin(x))
    assert torch.equal(new.bias, lin.bias) and new.weight.dtype == lin.weight.dtype
    assert torch.equal(reorder_activation(reorder_activation(x, idx), inverse_permutation(idx)), x)


def test_reorder_on_random_data_to_float32_rounding():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 64, bias=False)
    x = torch.randn(32, 256, generator=g) * torch.linspace(0.1, 30, 256)
    idx = torch.randperm(256, generator=g)
    torch.testing.assert_close(reorder_linear(lin, idx)(reorder_activation(x, idx)), lin(x), rtol=1e-5, atol=1e-5)
    assert reorder_linear(lin, idx).bias is None


def test_reordered_layer_inside_a_model_keeps_the_logits():
    """Swap a tiny model's down_proj for its reordered copy, gather its input with a pre-hook: same logits."""
    model, tok = atom_lab.tiny_model("mistral")
    text = ["Reordering is free: the sum over channels does not care about their order."]
    ids = tok(text, return_tensors="pt").input_ids
    stats = atom_lab.collect_stats(model, tok, text, n_tokens=ids.shape[1], seq_len=ids.shape[1], progress=False)
    idx = reorder_index(stats["model.layers.1.mlp.down_proj"])
    with torch.no_grad():
        ref = model(ids).logits
        mlp = model.model.layers[1].mlp
        mlp.down_proj = reorder_linear(mlp.down_proj, idx)
        mlp.down_proj.register_forward_pre_hook(lambda m, args: (reorder_activation(args[0], idx),))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_bad_index_is_a_clear_error():
    lin = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="has 3 entries but the layer has 4 input channels"):
        reorder_linear(lin, torch.arange(3))
    with pytest.raises(ValueError, match="not a permutation"):
        reorder_linear(lin, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(TypeError, match="torch.long"):
        reorder_activation(torch.ones(2, 4), torch.arange(4).int())
    with pytest.raises(TypeError, match="nn.Linear"):
        reorder_linear(torch.nn.Conv1d(4, 2, 1), torch.arange(4))
