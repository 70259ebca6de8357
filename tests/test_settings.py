"""Every flag also comes from the environment; flags win; empty values mean unset."""

from service.cli import SERVE_FLAGS, WORKER_FLAGS, parse_settings
from service.settings import Settings


def test_every_flag_is_a_setting_with_an_environment_variable():
    for name in set(SERVE_FLAGS) | set(WORKER_FLAGS):
        assert name in Settings.model_fields, name


def test_environment_sets_and_flags_override(monkeypatch):
    monkeypatch.setenv("FASTCACHE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("FASTCACHE_PORT", "9001")
    settings = parse_settings(SERVE_FLAGS, "test", ["--port", "9002"])
    assert settings.max_batch_size == 3
    assert settings.port == 9002


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("FASTCACHE_API_KEY", "")
    assert Settings().api_key is None


def test_invalid_values_are_refused(monkeypatch):
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        parse_settings(SERVE_FLAGS, "test", ["--max-batch-size", "0"])
