from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.pgserver import PostgresCluster
from tests.functional.voltproc import VoltProcess


@pytest.fixture
def volt_factory(tmp_path: Path) -> Iterator:
    """Make (and always stop) real volt-api processes: ``volt_factory(**options)``."""
    started: list[VoltProcess] = []

    def make(**options: object) -> VoltProcess:
        workdir = tmp_path / f"volt{len(started)}"
        workdir.mkdir()
        proc = VoltProcess(workdir, **options)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        if proc.proc is not None:
            proc.stop()


@pytest.fixture
def volt(volt_factory) -> VoltProcess:
    """One volt-api with the default executor and token auth."""
    return volt_factory()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL server on 127.0.0.1 for the whole session."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()
