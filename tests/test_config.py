import copy
import dataclasses

import pytest

from breastfusion.config import RunConfig, from_dict, load_run_config, save_yaml, to_dict
from breastfusion.errors import ConfigError
from breastfusion.presets import cpu_reference, demo_rows, paper_reference, table3_rows
from breastfusion.vocab import Modality


def test_yaml_round_trip(tmp_path):
    for cfg in table3_rows(cpu_reference()):
        path = save_yaml(cfg, tmp_path / "c.yaml")
        assert load_run_config(path) == cfg


def test_paper_defaults():
    cfg = paper_reference()
    m, t = cfg.model, cfg.train
    assert m.backbone.name == "resnet50" and m.backbone.frozen == "layer1" and m.backbone.weights == "imagenet"
    assert m.branch_dims == [1024, 512] and m.embedding_dim == 256 and m.head_dims == [128, 64]
    assert (m.arcface_scale, m.arcface_margin) == (30.0, 0.5)
    assert t.optimizer == "sgd" and t.lr == 1e-3 and t.epochs == 100
    assert cfg.cv.folds == 10 and cfg.cv.test_folds == 2
    assert m.mg_slots == ["CC-2D", "MLO-2D", "CC-synthesized", "MLO-synthesized"]


def test_unknown_key_and_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="model.colour"):
        from_dict(RunConfig, {"model": {"colour": 1}})
    with pytest.raises(ConfigError, match="fusion"):
        from_dict(RunConfig, {"model": {"fusion": "sum"}}).validate()
    with pytest.raises(ConfigError, match="unknown modality"):
        from_dict(RunConfig, {"model": {"modalities": ["CT"]}}).validate()
    with pytest.raises(ConfigError, match="frozen: all"):
        from_dict(RunConfig, {"train": {"mode": "cached"}}).validate()
    with pytest.raises(ConfigError, match="'attention' is learned"):
        from_dict(RunConfig, {"train": {"mode": "cached"},
                              "model": {"backbone": {"frozen": "all", "pooling": "attention"}}}).validate()


def _flat(cfg, prefix=""):
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


EXPECTED_DIFFS = {
    "single US": {"model.modalities"},
    "single MG": {"model.modalities"},
    "single MG without C-View": {"model.modalities", "model.mg_slots"},
    "concat MM": set(),
    "concat MM without C-View": {"model.mg_slots"},
    "concat MM without ArcFace": {"model.arcface"},
    "cross-attn MM": {"model.fusion"},
    "cross-attn MM without ArcFace": {"model.fusion", "model.arcface"},
    "cross-attn MM single head": {"model.fusion", "model.attention_heads"},
    "cross-attn MM L2-normalised": {"model.fusion", "model.l2_normalize"},
    "GoogLeNet MM": {"model.backbone.name", "model.arcface", "model.head"},
    "GoogLeNet MM without C-View": {"model.backbone.name", "model.arcface", "model.head", "model.mg_slots"},
    "plain head MM (Habib) on reference backbone": {"model.arcface", "model.head"},
}


@pytest.mark.parametrize("base", [paper_reference(), cpu_reference()])
@pytest.mark.parametrize("second_image", ["kind", "view"])
def test_each_table3_row_differs_from_reference_exactly_in_its_name(base, second_image):
    rows = table3_rows(base, second_image)
    without = {"kind": "without C-View", "view": "without MLO"}[second_image]
    expected = {k.replace("without C-View", without): v for k, v in EXPECTED_DIFFS.items()}
    assert [r.name for r in rows] == list(expected)
    ref = _flat(base)
    for row in rows:
        row.validate()
        flat = _flat(row)
        diff = {k for k in ref if k != "name" and flat[k] != ref[k]}
        assert diff == expected[row.name], row.name
    reduced = next(r for r in rows if r.name == f"single MG {without}")
    assert reduced.model.mg_slots == {"kind": ["CC-2D", "MLO-2D"], "view": ["CC-2D", "CC-synthesized"]}[second_image]


def test_second_image_ablation_follows_the_data():
    from breastfusion.presets import second_image_of
    from breastfusion.records import ImageRecord, Manifest
    from breastfusion.vocab import Kind, Modality, Side, View

    def rec(kind, view=View.CC):
        return ImageRecord("p", Side.LEFT, Modality.MG, f"/d/{view}{kind}.png", view, kind)

    assert second_image_of(Manifest([rec(Kind.STANDARD), rec(Kind.SYNTHESIZED)])) == "kind"
    assert second_image_of(Manifest([rec(Kind.STANDARD), rec(Kind.STANDARD, View.MLO)])) == "view"
    with pytest.raises(ConfigError, match="second_image"):
        table3_rows(cpu_reference(), "colour")


def test_demo_rows_are_us_mg_and_concat():
    rows = demo_rows()
    assert [r.name for r in rows] == ["single US", "single MG", "concat MM"]
    assert all(r.train.mode == "cached" and r.model.backbone.frozen == "all" for r in rows)
    assert to_dict(rows[2])["model"]["fusion"] == "concat"


def test_recommended_cpu_preset_keeps_each_rows_meaning():
    """table3-cpu (the recommended CPU recipe) sets a backbone per modality: every row still says
    what its name says, and the GoogLeNet rows put GoogLeNet in every branch, not only the default."""
    from breastfusion.presets import preset

    rows = {r.name: r for r in preset("table3-cpu")}
    for name, row in rows.items():
        names = {bb.name for bb in row.model.backbones().values()}
        assert names == ({"googlenet"} if name.startswith("GoogLeNet") else names - {"googlenet"}), name
        assert row.train.mode == "partial", name
    assert rows["single US"].model.backbones()[Modality.US].frozen == "layer3"
    mg = rows["single MG"].model.backbones()[Modality.MG]
    assert (mg.frozen, mg.pooling, mg.image_size) == ("all", "attention", 512)
    for name, row in rows.items():  # bilateral MG branch, except in Habib's GoogLeNet baseline
        assert row.model.bilateral is (not name.startswith("GoogLeNet")), name
    unilateral = {r.name: r for r in preset("table3-cpu-unilateral")}
    first = {r.name: r for r in preset("table3-cpu-mg128")}
    assert first.keys() == rows.keys() == unilateral.keys()
    for name, row in unilateral.items():  # the form before the bilateral branch: only that differs
        edited = copy.deepcopy(rows[name])
        edited.model.bilateral = False
        assert to_dict(edited) == to_dict(row), name
    for name, row in first.items():  # the first published form: only the MG backbone differs
        edited = copy.deepcopy(unilateral[name])
        edited.model.mg_backbone = row.model.mg_backbone
        assert to_dict(edited) == to_dict(row), name
    assert first["single MG"].model.backbones()[Modality.MG].image_size == 128
    old = {r.name: r for r in preset("table3-cpu-frozen128")}
    assert old.keys() == rows.keys() and all(r.train.mode == "cached" for r in old.values())


@pytest.mark.parametrize("name", ["demo", "table3", "table3-cpu", "table3-cpu-frozen128", "table3-cpu-partial",
                                  "table3-cpu-mg128", "table3-cpu-unilateral"])
def test_shipped_config_files_are_the_generated_presets(name):
    """configs/*.yaml are generated from the presets (`breastfusion config --write configs`), byte for
    byte, and `breastfusion experiment configs/X.yaml` runs exactly the preset."""
    from pathlib import Path

    import yaml

    from breastfusion.presets import preset, preset_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert path.read_text() == preset_yaml(name), "regenerate: breastfusion config --write configs"
    rows = [from_dict(RunConfig, r).validate() for r in yaml.safe_load(path.read_text())["rows"]]
    assert rows == preset(name)


def test_a_branch_is_named_by_its_own_backbone_not_the_other_modalitys():
    """The memo key of a trained single-modality branch (training/branches.py): rows whose US
    branches are the same network share it even when their MG backbones differ, and a backbone
    set as the shared default or per modality names the same branch."""
    import copy

    from breastfusion.training.branches import single_modality

    base = cpu_reference()
    other_mg = copy.deepcopy(base)
    other_mg.model.mg_backbone = dataclasses.replace(base.model.backbone, image_size=512, pooling="gem")
    assert single_modality(base.model, Modality.US) == single_modality(other_mg.model, Modality.US)
    assert single_modality(base.model, Modality.MG) != single_modality(other_mg.model, Modality.MG)
    per_modality = copy.deepcopy(base)
    per_modality.model.us_backbone = dataclasses.replace(base.model.backbone)
    assert single_modality(base.model, Modality.US) == single_modality(per_modality.model, Modality.US)
    us_only = single_modality(other_mg.model, Modality.US)
    assert us_only.backbones() == {Modality.US: base.model.backbone}
