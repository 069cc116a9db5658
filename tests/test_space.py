import pytest

from fbnas.errors import ConfigError
from fbnas.space import available_spaces, load_space, space_from_dict


def test_shipped_spaces_load():
    assert {"fbnet_cifar100", "fbnet", "mixed", "fmnist"} <= set(available_spaces())
    for name in available_spaces():
        s = load_space(name)
        assert s.w_bits == (2, 4, 8) and s.a_bits == (4, 8)
        assert s.fixed_w_bits == 8 and s.fixed_a_bits == 8


def test_fbnet_cifar100_macro_is_hwnasbench():
    s = load_space("fbnet_cifar100")
    assert s.candidates == ("ir_k3_e1", "ir_k3_e1_g2", "ir_k3_e3", "ir_k3_e6", "ir_k5_e1", "ir_k5_e1_g2",
                            "ir_k5_e3", "ir_k5_e6", "skip")
    layers = s.layers()
    assert len(layers) == 22
    assert (s.stem_channels, s.stem_stride, s.input_size, s.head_channels) == (16, 1, 32, 1504)
    firsts = [(l.c_out, l.stride, l.h_in) for l in layers if l.index in (0, 1, 5, 9, 13, 17, 21)]
    assert firsts == [(16, 1, 32), (24, 1, 32), (32, 2, 32), (64, 2, 16), (112, 1, 8), (184, 2, 8), (352, 1, 4)]
    assert layers[-1].h_out == 4


def test_fbnet_imagenet_macro():
    s = load_space("fbnet")
    assert s.input_size == 224 and s.head_channels == 1984 and s.stem_stride == 2
    assert [l.h_in for l in s.layers()][:3] == [112, 112, 56]
    assert s.final_size == 7


def test_mixed_space_has_all_families():
    s = load_space("mixed")
    fams = {c.split("_")[0] for c in s.candidates}
    assert {"ir", "sqnxt", "shuffle", "skip"} <= fams


def _base():
    return {"name": "t", "input": {"channels": 1, "size": 28}, "num_classes": 10,
            "stem": {"channels": 8, "stride": 1}, "stages": [{"channels": 8, "repeats": 1, "stride": 1}],
            "head": {"channels": 16}, "candidates": ["ir_k3_e1", "skip"],
            "bits": {"weights": [2, 4, 8], "activations": [4, 8]}}


def test_errors_name_field():
    raw = _base()
    raw["candidates"] = ["ir_k3_e1", "conv_magic"]
    with pytest.raises(ConfigError, match=r"x\.yaml: field 'candidates\[1\]' names unknown op 'conv_magic'"):
        space_from_dict(raw, "x.yaml")
    raw = _base()
    raw["bits"]["weights"] = [2, 9]
    with pytest.raises(ConfigError, match=r"field 'bits.weights' has bit-width 9; bit-widths must be integers in 1..8"):
        space_from_dict(raw, "x.yaml")
    raw = _base()
    raw["stages"][0]["repeats"] = 0
    with pytest.raises(ConfigError, match=r"field 'stages\[0\].repeats' must be a positive integer"):
        space_from_dict(raw, "x.yaml")
    raw = _base()
    raw["stagez"] = []
    with pytest.raises(ConfigError, match=r"field 'stagez' is not known here"):
        space_from_dict(raw, "x.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: [ {channels: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ malformed YAML"):
        load_space(p)


def test_candidate_shape_constraint_checked():
    raw = _base()
    raw["stem"]["channels"] = 7
    raw["stages"][0]["channels"] = 7
    raw["candidates"] = ["shuffle_k3"]
    with pytest.raises(ConfigError, match="shuffle_k3.*even"):
        space_from_dict(raw, "x.yaml")


def test_every_shipped_space_names_the_dataset_it_is_made_for(tmp_path):
    import yaml

    from fbnas.data import DATASETS
    from fbnas.io import data_dir

    for path in sorted(data_dir("search_spaces").glob("*.yaml")):
        space = load_space(path)
        assert space.dataset in DATASETS, path
        assert load_space(space.to_dict()["name"]).dataset == space.dataset
    raw = yaml.safe_load((data_dir("search_spaces") / "fmnist.yaml").read_text())
    raw["dataset"] = "mnist"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="field 'dataset' is 'mnist'; use one of fashion_mnist"):
        load_space(tmp_path / "bad.yaml")
