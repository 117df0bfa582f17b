"""The public API is exported completely from the package root."""

from __future__ import annotations

import inspect

import pytest

import raftchan
from raftchan import errors


def test_every_name_in_all_exists() -> None:
    missing = [name for name in raftchan.__all__ if not hasattr(raftchan, name)]
    assert missing == []


def test_all_has_no_duplicates() -> None:
    assert len(raftchan.__all__) == len(set(raftchan.__all__))


def test_every_public_error_class_is_exported() -> None:
    error_classes = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, errors.RaftchanError)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }
    assert error_classes <= set(raftchan.__all__)
    for name in error_classes:
        assert getattr(raftchan, name) is getattr(errors, name)


def test_every_wire_error_code_maps_to_an_exported_class() -> None:
    exported = {getattr(raftchan, name) for name in raftchan.__all__}
    assert set(errors.ERROR_CODES.values()) <= exported


def test_client_api_is_exported() -> None:
    for name in ("Client", "AsyncClient", "Channel", "AsyncChannel", "RetryPolicy"):
        assert name in raftchan.__all__
        assert inspect.isclass(getattr(raftchan, name))


def test_version() -> None:
    assert raftchan.__version__ == "0.1.0"


def test_configuration_errors_are_raftchan_errors_and_value_errors() -> None:
    for bad in ("no-port-here", "tcp://127.0.0.1:7101", "127.0.0.1:0", ""):
        with pytest.raises(raftchan.ConfigError) as caught:
            raftchan.Client(bad)
        assert isinstance(caught.value, raftchan.RaftchanError)
        assert isinstance(caught.value, ValueError)  # what it was before it joined the tree
