"""model.config: every YAML loads; bad keys and types fail at load time naming the key; round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from model.config import CONFIG_NAMES, load_model_config


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_loads(name):
    cfg = load_model_config(name)
    assert cfg.name == name
    assert cfg.pixel_encoder["type"] in ("resnet50", "vit", "vit_spatial", "vit_spatial_semantic")


def test_table3_ladder():
    rows = {n: load_model_config(n) for n in CONFIG_NAMES}
    assert rows["cutie_base"].encoder_type == "resnet50"
    assert not rows["cutie_base"].object_transformer.discriminative_query
    assert (rows["cutie_base"].object_transformer.num_blocks, rows["cutie_base"].object_transformer.num_queries) == (3, 16)
    assert rows["cutie_dq"].object_transformer.discriminative_query and rows["cutie_dq"].encoder_type == "resnet50"
    assert rows["cutie_dq_vit"].encoder_type == "vit"
    assert rows["cutie_dq_vit_spatial"].encoder_type == "vit_spatial"
    s3 = rows["s3"]
    assert s3.encoder_type == "vit_spatial_semantic" and s3.object_transformer.discriminative_query
    assert (s3.object_transformer.num_blocks, s3.object_transformer.num_queries) == (5, 8)
    assert s3.drop_path == pytest.approx(0.15)
    assert s3.pixel_encoder["freeze_vit"] is True


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"bogus": 1}, "bogus"),
        ({"object_transformer": {"num_block": 3}}, "object_transformer.num_block"),
        ({"object_transformer": {"num_blocks": "5"}}, "object_transformer.num_blocks"),
        ({"object_transformer": {"discriminative_query": 1}}, "object_transformer.discriminative_query"),
        ({"key_dim": 64.0}, "key_dim"),
        ({"drop_path": "0.1"}, "drop_path"),
        ({"drop_path": 1.5}, "drop_path"),
        ({"decoder_up_dims": [32, 16]}, "decoder_up_dims"),
        ({"object_transformer": {"num_queries": 5}}, "object_transformer.num_queries"),
        ({"object_transformer": {"num_heads": 5}}, "object_transformer.num_heads"),
        ({"loss": {"num_points": -1}}, "loss.num_points"),
        ({"mask_encoder": {"type": "resnet50"}}, "mask_encoder.type"),
        ({"pixel_encoder": {"spatial_dim": "x"}}, "pixel_encoder.spatial_dim"),
        ({"pixel_encoder": {"colour": 1}}, "colour"),
        ({"inference": {"top_kk": 3}}, "top_kk"),
        ({"pad_to": 16}, "pad_to"),
    ],
)
def test_bad_values_name_the_key(overrides, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(".", r"\.")):
        load_model_config("tiny", overrides)


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        load_model_config("nope")
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_model_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npixel_encoder: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_model_config(bad)


def test_overrides_merge_nested_and_round_trip(tmp_path):
    cfg = load_model_config("s3", {"num_objects": 2, "pixel_encoder": {"init": "random", "weights": None},
                                   "object_transformer": {"num_blocks": 2}})
    assert cfg.num_objects == 2 and cfg.object_transformer.num_blocks == 2
    assert cfg.object_transformer.num_queries == 8  # untouched sibling kept
    assert cfg.pixel_encoder["type"] == "vit_spatial_semantic" and cfg.pixel_encoder["weights"] is None
    path = tmp_path / "sidecar.model.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_model_config(path) == cfg


def test_json_sidecar_loads(tmp_path):
    import json

    cfg = load_model_config("tiny")
    path = tmp_path / "iter_0000010.model.yaml"
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    assert load_model_config(str(path)) == cfg
