"""Plugin discovery and declarations: enabled by name and version, reported (never raised) when broken."""

from __future__ import annotations

import pytest

from app import plugins
from app.ml.space import Context, SpaceError, resolve_space
from app.schemas.study import StudySpec


def test_only_enabled_plugins_in_the_pinned_version_are_known() -> None:
    found = plugins.Plugins(["seqconv==0.1.0", "waveforms==9.9", "Bad Name"])
    assert found.names(plugins.PluginKind.MODEL) == ["seqconv"]
    assert found.names(plugins.PluginKind.DATASET) == []  # installed, but not in version 9.9
    assert "not installed in version 9.9" in found.problems["waveforms"]
    assert "name==version" in found.problems["Bad Name"]
    with pytest.raises(plugins.PluginError, match="enabled models are mlp, cnn, seqconv"):
        found.model("brokenbuild")


def _spec(model: str, dataset: str) -> StudySpec:
    return StudySpec.model_validate({"name": "s", "model": model, "dataset": dataset})


def test_a_study_is_runnable_only_with_its_model_and_dataset_plugins() -> None:
    found = plugins.Plugins(["seqconv"])
    assert found.can_run(_spec("mlp", "builtin:iris"))
    assert found.can_run(_spec("seqconv", "builtin:iris"))
    assert not found.can_run(_spec("seqconv", "plugin:waveforms"))
    assert not plugins.Plugins([]).can_run(_spec("seqconv", "builtin:iris"))


def test_declared_hyperparameters_take_the_documented_form_and_rules() -> None:
    table = plugins.plugin_space("toy", [
        {"name": "width", "type": "int", "low": 4, "high": 16, "domain": [1, 64], "note": "Width."},
        {"name": "mode", "type": "categorical", "choices": ["a", "b"], "note": "Mode."}], own_loop=False)
    assert [hp.name for hp in table][:2] == ["width", "mode"] and "learning_rate" in {hp.name for hp in table}
    assert table[0].describe("toy")["domain"] == [1, 64]
    with pytest.raises(plugins.PluginError, match="outside its domain"):
        plugins.plugin_space("toy", [{"name": "w", "type": "int", "low": 4, "high": 99, "domain": [1, 64],
                                      "note": "W."}], own_loop=False)
    with pytest.raises(plugins.PluginError, match="bad hyperparameter"):
        plugins.plugin_space("toy", [{"name": "w", "type": "int", "low": 1, "high": 2}], own_loop=True)
    assert [hp.name for hp in plugins.plugin_space("toy", [], own_loop=True)] == []


def test_a_spec_is_checked_against_a_plugins_space_like_a_built_in() -> None:
    plugins.configure(["seqconv"])
    seqconv = Context("seqconv", table=plugins.table_for("seqconv"))
    resolved = resolve_space({"channels": 16, "kernel": {"choices": [3, 7]}}, seqconv)
    assert resolved["channels"] == 16 and "optimizer" in resolved and "units" not in resolved
    with pytest.raises(SpaceError) as bad:
        resolve_space({"kernel": 4}, seqconv)
    assert bad.value.loc == ("kernel",) and "[3, 5, 7, 9]" in bad.value.message
    with pytest.raises(SpaceError, match="unknown hyperparameter"):
        resolve_space({"units": 8}, seqconv)
