from pathlib import Path

import pytest
import yaml

from components.config import ParamsError, apply_overrides, flatten, load_params, parse_override
from tests.conftest import REPO


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_parse():
    p = load_params(REPO / "params.yaml")
    assert p.data.source == "synthetic"
    assert p.evaluation.ks == [10, 20]
    assert isinstance(p.data.synthetic.mean_gap_seconds, float)


def test_params_are_frozen():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        p.seed = 1  # type: ignore[misc]


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, lambda r: r["mf"].update(factorz=3))
    with pytest.raises(ParamsError, match=r"unknown key under mf: mf\.factorz"):
        load_params(path)


def test_unknown_top_level_section_is_named(tmp_path):
    path = write(tmp_path, lambda r: r.update(trainer={"lr": 1}))
    with pytest.raises(ParamsError, match="unknown key: trainer"):
        load_params(path)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, lambda r: r["data"]["synthetic"].update(n_users="many"))
    with pytest.raises(ParamsError, match=r"data\.synthetic\.n_users: expected int, got 'many'"):
        load_params(path)


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path, lambda r: r["mf"].update(factors=True))
    with pytest.raises(ParamsError, match=r"mf\.factors: expected int"):
        load_params(path)


def test_missing_key_is_named(tmp_path):
    path = write(tmp_path, lambda r: r["mf"].pop("alpha"))
    with pytest.raises(ParamsError, match=r"mf\.alpha: missing"):
        load_params(path)


def test_literal_choice_is_checked():
    with pytest.raises(ParamsError, match=r"data\.source: expected one of"):
        load_params(REPO / "params.yaml", ["data.source=csv"])


def test_list_items_are_checked():
    with pytest.raises(ParamsError, match=r"evaluation\.ks\[1\]: expected int"):
        load_params(REPO / "params.yaml", ["evaluation.ks=[10, ten]"])


def test_overrides_parse_yaml_values():
    p = load_params(
        REPO / "params.yaml",
        ["mf.factors=128", "mf.alpha=20", "evaluation.ks=[5, 50]", "data.unisrec_name=Scientific",
         "params.yaml:seed=7", "validation.weight_max=null"],
    )
    assert p.mf.factors == 128
    assert p.mf.alpha == 20.0 and isinstance(p.mf.alpha, float)
    assert p.evaluation.ks == [5, 50]
    assert p.data.unisrec_name == "Scientific"
    assert p.seed == 7
    assert p.validation.weight_max is None


def test_float_in_exponent_notation_without_a_dot():
    # YAML 1.1 reads 1e-7 as a string; as a float setting it is what the user meant.
    assert load_params(REPO / "params.yaml", ["bert.finetune.lr=1e-7"]).bert.finetune.lr == 1e-7
    with pytest.raises(ParamsError, match=r"bert\.finetune\.lr: expected float, got 'fast'"):
        load_params(REPO / "params.yaml", ["bert.finetune.lr=fast"])


def test_override_of_unknown_key_fails():
    with pytest.raises(ParamsError, match=r"unknown key mf\.factorz"):
        load_params(REPO / "params.yaml", ["mf.factorz=3"])
    with pytest.raises(ParamsError, match=r"unknown key nope"):
        load_params(REPO / "params.yaml", ["nope.x=3"])


def test_override_syntax_errors():
    with pytest.raises(ParamsError, match="expected dotted.key=value"):
        parse_override("mf.factors")
    with pytest.raises(ParamsError, match="empty key"):
        parse_override("mf..factors=3")
    with pytest.raises(ParamsError, match="only params.yaml"):
        parse_override("other.yaml:mf.factors=3")


def test_apply_overrides_does_not_mutate_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2"])
    assert raw == {"a": {"b": 1}} and out == {"a": {"b": 2}}


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": None}) == {"a.b": 1, "a.c.d": [1], "e": None}


def test_cli_reports_params_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "components.features", "--set", "features.min_user=3"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "unknown key features.min_user" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_spark_settings_are_a_mapping_of_spark_names():
    base = REPO / "params.yaml"
    p = load_params(base, ["data.engine=spark", "data.spark.conf={spark.executor.memory: 8g, spark.sql.adaptive.enabled: true}"])
    assert p.data.engine == "spark"
    # Handed to Spark as text, as its own settings are (YAML's true is Spark's "true").
    assert p.data.spark.conf == {"spark.executor.memory": "8g", "spark.sql.adaptive.enabled": "true"}
    with pytest.raises(ParamsError, match="data.spark.conf: Spark settings start with 'spark.', got driver.memory"):
        load_params(base, ["data.spark.conf={driver.memory: 8g}"])
    with pytest.raises(ParamsError, match="data.spark.conf: expected a mapping"):
        load_params(base, ["data.spark.conf=[spark.driver.memory]"])
    with pytest.raises(ParamsError, match="data.engine: expected one of 'default' | 'spark'"):
        load_params(base, ["data.engine=duckdb"])


def test_dropout_rates_are_checked():
    with pytest.raises(ParamsError, match=r"bert\.attention_dropout must be in \[0, 1\), got 1\.0"):
        load_params(REPO / "params.yaml", ["bert.attention_dropout=1.0"])
    # Packed masks draw in steps of 2^-16: a rate that rounds to 1 is refused with them, not
    # at the first training step; torch's own dropout takes it.
    with pytest.raises(ParamsError, match=r"bert\.dropout must be below 1 - 2\^-17 with bert\.trainer\.packed_dropout"):
        load_params(REPO / "params.yaml", ["bert.dropout=0.999995", "bert.trainer.packed_dropout=true"])
    assert load_params(REPO / "params.yaml", ["bert.dropout=0.999995",
                                              "bert.trainer.packed_dropout=false"]).bert.dropout == 0.999995


def test_heads_share_the_width_equally():
    with pytest.raises(ParamsError, match=r"bert\.hidden_size \(64\) must be a multiple of bert\.num_heads \(3\)"):
        load_params(REPO / "params.yaml", ["bert.hidden_size=64", "bert.num_heads=3"])
