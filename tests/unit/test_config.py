"""Config errors name the field and the allowed values; overrides and flattening behave."""

import pytest

from raysl.config import ConfigError, flatten, load_config, parse_config


def test_unknown_key_names_field_and_allowed_fields() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"uri": "/x"}, "optim": {"lrr": 0.1}})
    msg = str(e.value)
    assert "optim.lrr" in msg and "unknown field" in msg
    assert "lr" in msg and "weight_decay" in msg  # the fields that are allowed there


def test_wrong_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"uri": "/x"}, "optim": {"name": "adam"}})
    msg = str(e.value)
    assert "optim.name" in msg and "'lars'" in msg and "'adamw'" in msg and "'adam'" in msg


def test_wrong_type_names_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps"):
        parse_config({"data": {"uri": "/x"}, "train": {"steps": "many"}})


def test_missing_data_uri_is_named() -> None:
    with pytest.raises(ConfigError, match=r"data"):
        parse_config({})


def test_yaml_file_with_dotted_overrides(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data: {uri: s3://b/p}\noptim: {lr: 0.5}\n")
    cfg = load_config(f, ["optim.lr=3e-4", "train.steps=7", "method.views.crop_scale=[0.2, 1.0]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7
    assert cfg.method.views.crop_scale == (0.2, 1.0)
    assert cfg.data.uri == "s3://b/p"


def test_yaml_is_loaded_safely(tmp_path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("data: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception) as e:
        load_config(f)
    assert "python/object" in str(e.value)


def test_builtin_config_by_name() -> None:
    cfg = load_config("byol", ["data.uri=/tmp/x"])
    assert cfg.method.name == "byol" and cfg.optim.name == "lars"


def test_flatten_drops_secrets() -> None:
    flat = flatten({"s3": {"endpoint_url": "http://h", "secret_access_key": "SHH"}, "aws_session_token": "T"})
    assert flat == {"s3.endpoint_url": "http://h"}


def test_method_union_errors_name_the_method_fields() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"uri": "/x"}, "method": {"name": "ijepa", "predictor_dpth": 3}})
    assert "predictor_dpth" in str(e.value) and "predictor_depth" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"uri": "/x"}, "method": {"name": "simclr"}})
    assert "'byol'" in str(e.value) and "'ijepa'" in str(e.value)


def test_placeholder_uri_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.uri.*required"):
        load_config("byol")
