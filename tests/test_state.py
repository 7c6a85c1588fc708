"""The federation's state: the best-round rule (mean or median of the clients' val
accuracies), against a lying val accuracy and in a run whose training only hurts."""

from __future__ import annotations

import pytest

from fedclip.config import RunConfig
from fedclip.core.records import RoundRecord
from fedclip.core.server import selection_rule
from fedclip.core.state import FederationState
from fedclip.errors import TrainingError
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, toy_cfg
from tests.test_federation import (
    in_process,
    pacs_like,  # noqa: F401  (a fixture)
)

run = as_written(_experiment.run)


def _rounds(liar: bool) -> list[RoundRecord]:
    records = []
    for r in range(9):
        honest = 0.5 + 0.04 * r  # both honest clients improve every round
        lie = (1.0 if r == 1 else 0.0) if liar else honest
        record = RoundRecord(r)
        record.set_evaluation({"a": honest, "b": honest + 0.01, "liar": lie},
                              {"a": 0.5, "b": 0.5, "liar": 0.5}, None)
        records.append(record)
    return records


def _selected(records: list[RoundRecord], rule: str) -> int:
    state = FederationState(0, None)
    for record in records:
        state.select(record, rule)
    return state.best_round


def test_one_lying_node_moves_the_mean_rule_but_not_the_median_rule():
    assert _selected(_rounds(liar=False), "mean") == 8
    assert _selected(_rounds(liar=True), "mean") == 1  # the attack, on the mean
    assert _selected(_rounds(liar=True), "median") == 8
    # the guarantee: with one liar among three, each round's median lies between the two
    # honest values, so a round every honest node rates lower cannot win
    for record in _rounds(liar=True):
        honest = [record.val_accuracy["a"], record.val_accuracy["b"]]
        assert min(honest) <= record.val_score("median") <= max(honest)


def test_robust_aggregators_select_by_the_median():
    assert selection_rule(RunConfig.build(aggregation="weighted")) == "mean"
    for mode in ("median", "trimmed-mean", "krum", "multikrum", "bulyan"):
        assert selection_rule(RunConfig.build(aggregation=mode)) == "median"


def test_as_written_results_name_the_selection_rule(tiny_arch, pacs_like, tmp_path):  # noqa: F811
    result = in_process(tiny_arch, pacs_like, tmp_path, aggregation="median", rounds=1)
    assert result["selection"] == "median of the clients' val accuracies"


def test_round_zero_competes_for_selection(tiny_arch, toy_root, tmp_path):
    """A run whose training only hurts selects round 0 (the initial adapter)."""
    cfg = toy_cfg(toy_root, tiny_arch, rounds=2, lr=10.0, weight_decay=0.0, batch_size=2)
    try:
        r = run(cfg, tmp_path / "r")[0]
    except TrainingError:
        pytest.skip("diverged to NaN before selection: covered by the divergence test")
    vals = [h["mean_val_accuracy"] for h in r["history"]]
    assert r["best_round"] == max(range(len(vals)), key=lambda i: (vals[i], -i))
