"""Fixtures of the integration tier: real services, started by the tests themselves."""

from __future__ import annotations

import pytest

from tests.mlflow_server import mlflow_server


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A real MLflow server (SQLite) and Prefect's test harness (a real, temporary API server),
    one of each per test module: (tracking URI, the module's folder)."""
    from prefect.testing.utilities import prefect_test_harness

    folder = tmp_path_factory.mktemp("services")
    with mlflow_server(folder / "mlflow") as uri, prefect_test_harness(server_startup_timeout=120):
        yield uri, folder
