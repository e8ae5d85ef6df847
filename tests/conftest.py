"""Test tiers follow the directory: tests/unit -> ``unit``, tests/functional -> ``functional``."""

import pathlib

import pytest

pytest_plugins = ["tests.functional.clusterfixtures"]

TIMEOUTS = {"unit": 60, "functional": 300}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = pathlib.Path(item.fspath).relative_to(config.rootpath).parts[1]
        if tier in TIMEOUTS:
            item.add_marker(getattr(pytest.mark, tier))
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TIMEOUTS[tier]))
