import pytest

from kvlib.engine import data


def test_explicit_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data.resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.resolve_data_dir(tmp_path / "missing")


def test_missing_everywhere(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "_SIBLING", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="README.md"):
        data.resolve_data_dir()
