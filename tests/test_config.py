"""AtomConfig: presets by name, and validation errors that name the numbers and a fix."""
import pytest

from atom_lab.config import PRESETS, AtomConfig, ablation_configs


def test_presets_by_name():
    assert list(PRESETS) == ["fp16", "w8a8", "w4a16", "w4a4-rtn", "atom", "quarot", "atom+rotation", "atom-g32"]
    atom = AtomConfig.preset("atom")
    assert (atom.w_bits, atom.a_bits, atom.group_size, atom.keeper, atom.keeper_bits) == (4, 4, 64, 128, 8)
    assert (atom.w_clip, atom.a_clip, atom.sort_metric, atom.gptq, atom.kv_bits) == (0.85, 0.9, "hessian", True, 4)
    rtn = AtomConfig.preset("w4a4-rtn")
    assert rtn.group_size is None and rtn.keeper == 0 and rtn.sort_metric is None and not rtn.gptq
    assert AtomConfig.preset("w8a8").smooth_alpha == 0.5 and not AtomConfig.preset("fp16").quantizes
    w4a16 = AtomConfig.preset("w4a16")
    assert w4a16.a_bits == 16 and w4a16.gptq and w4a16.group_size == 128 and not w4a16.w_symmetric
    assert AtomConfig.preset("atom", group_size=128).group_size == 128  # the paper's recipe for Llama shapes


def test_unknown_preset_and_field_listed():
    with pytest.raises(ValueError, match="fp16, w8a8, w4a16, w4a4-rtn, atom"):
        AtomConfig.preset("w4a8")
    with pytest.raises(ValueError, match="group_sz.*group_size"):
        AtomConfig.preset("atom", group_sz=64)


def test_group_size_that_does_not_divide_names_both_numbers_and_fixes():
    atom128 = AtomConfig.preset("atom", group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the 448 normal channels.*"
                                         r"in_features=576 - keeper=128.*group_size=64.*keeper=64"):
        atom128.layer_group_size(576, "model.layers.0.self_attn.q_proj")
    assert atom128.layer_group_size(1536) == 128  # 1408 = 11 x 128
    assert AtomConfig.preset("atom").layer_group_size(576) == 64
    with pytest.raises(ValueError, match="keeper=128 leaves no normal channels"):
        AtomConfig.preset("atom").layer_group_size(128)


def test_group_fallback_for_w4a16():
    w4a16 = AtomConfig.preset("w4a16")
    assert w4a16.layer_group_size(576) == 64 and w4a16.layer_group_size(1536) == 128
    assert w4a16.layer_group_size(100) is None  # nothing of 128/64/32 divides: per output channel
    assert AtomConfig.preset("w4a16", group_size=None).layer_group_size(576) is None


def test_packed_only_for_atom_style_layers():
    atom = AtomConfig.preset("atom")
    assert atom.packed(576) and atom.packed(1536)
    assert not AtomConfig.preset("w4a4-rtn").packed(576)  # per channel: not kernel groups
    assert not AtomConfig.preset("w4a16").packed(576)
    assert not atom.replace(keeper_bits=16).packed(576)
    assert atom.replace(keeper=0, sort_metric=None).packed(576)  # groups only, no keeper: still packable


@pytest.mark.parametrize("changes, match", [
    (dict(w_bits=1), "w_bits=1"),
    (dict(a_bits=12), "a_bits=12"),
    (dict(kv_bits=0), "kv_bits=0"),
    (dict(keeper_bits=4), "keeper_bits=4"),
    (dict(group_size=0), "group_size=0"),
    (dict(keeper=-1), "keeper=-1"),
    (dict(sort_metric=None), "keeper=128 needs reordering.*sort_metric='hessian' or keeper=0"),
    (dict(sort_metric="l2"), "sort_metric='l2'"),
    (dict(w_clip=1.5), r"w_clip=1.5.*\(0, 1\]"),
    (dict(a_clip="auto"), "a_clip='auto'.*'search'"),
    (dict(gptq_damp=0.0), "gptq_damp"),
    (dict(smooth_alpha=0.5), "smooth_alpha and sort_metric"),
    (dict(w_bits=16, gptq=True), "gptq=True needs quantized weights"),
])
def test_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        AtomConfig.preset("atom").replace(**changes)


def test_ablation_rows_add_one_technique_each():
    rows = ablation_configs()
    names = [c.name for c in rows]
    assert names == ["fp16", "w8a8", "w4a16", "w4a4-rtn", "+ group 64", "+ reorder, 128 INT8 keeper",
                     "+ clip 0.85 / 0.9", "+ GPTQ", "+ INT4 KV = atom"]
    rtn, group, reorder, clip, gptq, atom = rows[3:]
    assert group == rtn.replace(group_size=64, name=group.name)
    assert reorder == group.replace(keeper=128, sort_metric="hessian", name=reorder.name)
    assert clip == reorder.replace(w_clip=0.85, a_clip=0.9, name=clip.name)
    assert gptq == clip.replace(gptq=True, name=gptq.name)
    assert atom == gptq.replace(kv_bits=4, name=atom.name) == AtomConfig.preset("atom", name=atom.name)
