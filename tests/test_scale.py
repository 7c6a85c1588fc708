"""Many clients, cheaply: partial participation, Dirichlet partitions with guarantees, the
configured device, batched multi-client training equal to the sequential loop."""

import numpy as np

from fedclip.config import RunConfig
from fedclip.data.splits import partition
from fedclip.experiment import run
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as server_main
from fedclip.sampling import sample_clients
from tests.flower_grid import LocalGrid


def test_sampling_is_seeded_and_independent_of_order():
    names = [f"c{i:03d}" for i in range(400)]
    a = sample_clients(names, 40, seed=3, server_round=7)
    assert a == sample_clients(list(reversed(names)), 40, seed=3, server_round=7)
    assert len(set(a)) == 40 and a != sample_clients(names, 40, seed=3, server_round=8)
    assert sample_clients(names, 0, 3, 1) == sorted(names)


def test_partial_participation_is_the_same_in_both_runtimes(tiny_arch, toy_root, tmp_path):
    extra = {"clients_per_domain": 2, "clients_per_round": 2, "rounds": 3, "lr": 1e-3,
             "personalize_epochs": 0}
    local = run(RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                                **extra), tmp_path / "local")[0]
    run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "gamma",
                  "classes": "cat,dog,red_car", "out": str(tmp_path / "flower"),
                  **{k.replace("_", "-"): v for k, v in extra.items()}}
    nodes = [{"partition-id": i, "num-partitions": 5} for i in range(5)]
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    trained = [sorted(r["train_loss"]) for r in local["history"][1:]]
    assert trained == [sorted(r["train_loss"]) for r in flower["history"][1:]]
    assert all(len(t) == 2 for t in trained) and len({tuple(t) for t in trained}) > 1
    adapter = 2 * (32 * 32 + 32)
    assert local["bytes_per_round"] == flower["bytes_per_round"] == 2 * 2 * adapter * 4
    assert all(r["missing"] == [] for r in flower["history"][1:])


def test_dirichlet_has_no_empty_client_and_skews_more_as_alpha_falls():
    labels = np.repeat(np.arange(7), 300)  # 2,100 images, 7 classes
    def skew(alpha):
        parts = partition(labels, 100, "dirichlet", alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
        assert min(len(p) for p in parts) == 21  # 2,100 / 100: sizes as equal as possible
        # mean total-variation distance of a client's label mix from the global mix
        return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=7) / len(p) - 1 / 7).sum()
                        for p in parts])
    low, mid, high = skew(0.1), skew(1.0), skew(100.0)
    assert low > mid > high and low > 3 * high and high < 0.25
