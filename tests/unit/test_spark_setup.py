"""Starting the Spark engine where Java is missing or too old: an error that says how to get
it, before Spark is touched (no Java needed to run these)."""

from __future__ import annotations

import pytest

from components.spark import SparkUnavailable, java_version, session
from tests.conftest import tiny_params


def fake_java(folder, version_line: str):
    (folder / "bin").mkdir(parents=True)
    java = folder / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return folder


@pytest.mark.parametrize(("line", "major"), [('openjdk version "17.0.15" 2025-04-15', 17),
                                             ('java version "1.8.0_412"', 8), ('openjdk version "21" 2023-09-19', 21)])
def test_java_version_reads_the_major_version(tmp_path, monkeypatch, line, major):
    monkeypatch.setenv("JAVA_HOME", str(fake_java(tmp_path, line)))
    assert java_version() == major


def test_an_old_or_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    cfg = tiny_params("data.engine=spark").data.spark
    monkeypatch.setenv("JAVA_HOME", str(fake_java(tmp_path / "old", 'openjdk version "11.0.2" 2019-01-15')))
    with pytest.raises(SparkUnavailable, match=r"Java 17 or later \(found Java 11\).*apt-get install openjdk-17-jre-headless"):
        session(cfg)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SparkUnavailable, match=r"no Java found"):
        session(cfg)
    assert SparkUnavailable.exit_code == 2  # a CLI prints the message, no traceback
