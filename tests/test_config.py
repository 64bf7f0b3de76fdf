import pytest

from engagesim.config import DEFAULT_CONFIG, ConfigError, load_config


def test_local_default_loads():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.ray.address is None
    assert cfg.synth.users > 0


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  userz: 10\n")
    with pytest.raises(ConfigError, match=r"synth\.userz: unknown key"):
        load_config(path)


def test_bad_value_names_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  max_text_chars: -3\n")
    with pytest.raises(ConfigError, match=r"ingest\.max_text_chars"):
        load_config(path)


def test_cross_field_rule_is_explained():
    with pytest.raises(ConfigError, match="images must not exceed posts"):
        load_config(None, ["synth.posts=20", "synth.images=50"])


def test_overrides_are_typed_and_merged():
    cfg = load_config(DEFAULT_CONFIG, ["synth.seed=7", "storage.s3_endpoint=http://127.0.0.1:9"])
    assert cfg.synth.seed == 7 and cfg.storage.s3_endpoint == "http://127.0.0.1:9"
    assert cfg.synth.users == load_config(DEFAULT_CONFIG).synth.users


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["synth.seed"])


def test_every_shipped_config_loads():
    """configs/*.yaml are documentation users copy: each must pass validation as shipped."""
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        cfg = load_config(path, [])
        assert cfg.output_root, path


def test_te_smoothing_is_a_count_or_auto():
    assert load_config(None, ["features.te_smoothing=auto"]).features.te_smoothing == "auto"
    assert load_config(None, ["features.te_smoothing=2.5"]).features.te_smoothing == 2.5
    with pytest.raises(ConfigError, match=r"features\.te_smoothing"):
        load_config(None, ["features.te_smoothing=-1"])


def test_the_dashboard_is_a_setting_and_its_url_is_printed(monkeypatch, capsys):
    """ray.include_dashboard reaches ray.init, and the embedded Ray's dashboard URL goes to stderr."""
    import types

    import ray

    from engagesim.runtime import ensure_ray

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(dashboard_url="127.0.0.1:8265")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ensure_ray(load_config(None, ["ray.include_dashboard=true"]).ray)
    assert seen["include_dashboard"] is True and "Ray dashboard: http://127.0.0.1:8265" in capsys.readouterr().err
    ensure_ray(load_config(None).ray)
    assert seen["include_dashboard"] is False
