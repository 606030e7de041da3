"""The repository layout keeps the promises the README makes."""

from __future__ import annotations

from tests.conftest import REPO


def test_mlflow_config_folder_never_shadows_the_mlflow_package():
    # `mlflow/` holds the tracking server's scripts; an __init__.py would make `import mlflow`
    # pick it up from the repository root instead of the installed package.
    assert not (REPO / "mlflow" / "__init__.py").exists()
    import mlflow

    assert hasattr(mlflow, "MlflowClient"), mlflow.__file__
