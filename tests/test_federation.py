"""A real federation: sites that hold only their own data, identities checked, a server that
trusts no client, and a Flower run as complete as an in-process one (in-memory grid)."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from safetensors.torch import load_file

from fedclip.config import RunConfig
from fedclip.errors import ConfigError, DataError
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, make_image_folder
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
server_main = as_written(_server_main)

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


@pytest.fixture
def pacs_like(tmp_path):
    """A small folder with PACS's domain and class names: the spec is detected, so the run
    (and every node) knows the classes and the planned training domains."""
    return make_image_folder(tmp_path / "pacs", {d: {c: 5 for c in PACS_CLASSES}
                                                 for d in DOMAINS}, size=32)


def own_sites(root, tmp_path, layout="nested"):
    """One folder per site holding only that site's domain (nested: <domain>/<class>/...;
    flat: <class>/... directly)."""
    configs = []
    for d in sorted(p.name for p in root.iterdir()):
        site = tmp_path / "sites" / d
        shutil.copytree(root / d, site / d if layout == "nested" else site)
        configs.append({"data-root": str(site), "domain": d})
    return configs


def flower_config(tiny_arch, tmp_path, heldout="sketch", **extra):
    return {"backbone": tiny_arch, "heldout": heldout, "rounds": 3, "lr": 1e-3,
            "out": str(tmp_path / "flower"), "discover-timeout": 5.0, **extra}


def in_process(tiny_arch, root, tmp_path, heldout="sketch", name="local", **extra):
    cfg = RunConfig.build(**{"backbone": tiny_arch, "data_root": str(root), "heldout": heldout,
                             "rounds": 3, "lr": 1e-3, **extra})
    return run(cfg, tmp_path / name)[0]


def adapter(path):
    return load_file(path)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


# --- sites hold only their own data -----------------------------------------------------------
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_nodes_with_only_their_own_domain_equal_the_in_process_run(tiny_arch, pacs_like,
                                                                   tmp_path, layout):
    nodes = own_sites(pacs_like, tmp_path, layout)
    run_config = flower_config(tiny_arch, tmp_path, **{"eval-every": 2})
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    local = in_process(tiny_arch, pacs_like, tmp_path, eval_every=2)
    assert max_diff(adapter(tmp_path / "flower/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "local/sketch/adapter-last.safetensors")) < 1e-5
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r.get(key) for r in flower["history"]] == [r.get(key) for r in local["history"]]
    assert [("val_accuracy" in r) for r in flower["history"]] == [True, False, True, True]
    assert flower["personalized"]["per_client"] == local["personalized"]["per_client"]
    assert flower["personalized"]["epochs"] == local["personalized"]["epochs"]
    assert flower["best_round"] == local["best_round"] and flower["zeroshot"] == local["zeroshot"]
    assert flower["dataset"] == local["dataset"] == "pacs"
    assert flower["heldout_images"] == local["heldout_images"] == 35
    assert flower["clients"] == local["clients"]


def test_partitions_depend_on_the_domain_name_not_on_the_other_folders(tiny_arch, pacs_like,
                                                                       tmp_path):
    from fedclip.flower.site import load_site

    cfg = RunConfig.build(backbone=tiny_arch, heldout="sketch", clients_per_domain=2,
                          partition="dirichlet", dirichlet_alpha=0.3)
    alone = tmp_path / "alone"
    shutil.copytree(pacs_like / "photo", alone / "photo")
    for index in (0, 1):
        a = load_site(cfg, alone, "photo", index)
        b = load_site(cfg, pacs_like, "photo", index)
        assert a.name == b.name == f"photo#{index}"
        assert torch.equal(a.data.train.x, b.data.train.x)
        assert torch.equal(a.data.test.y, b.data.test.y)


def test_a_node_with_other_classes_is_refused_with_their_names(tiny_arch, pacs_like, tmp_path):
    from fedclip.flower.site import load_site

    (pacs_like / "photo" / "dog").rename(pacs_like / "photo" / "dgo")
    cfg = RunConfig.build(backbone=tiny_arch, heldout="sketch")
    with pytest.raises(DataError, match=r"'dgo' \(did you mean 'dog'\?\)"):
        load_site(cfg, pacs_like, "photo")


def test_a_node_missing_a_class_is_masked(tiny_arch, pacs_like, tmp_path):
    from fedclip.flower.site import load_site

    shutil.rmtree(pacs_like / "cartoon" / "house")
    site = load_site(RunConfig.build(backbone=tiny_arch, heldout="sketch"), pacs_like, "cartoon")
    assert site.data.class_mask.tolist() == [c != "house" for c in PACS_CLASSES]


# --- identities --------------------------------------------------------------------------------
def test_two_nodes_claiming_one_client_are_refused(tiny_arch, pacs_like, tmp_path):
    nodes = own_sites(pacs_like, tmp_path)
    nodes.append(dict(nodes[0]))  # a second art_painting
    run_config = flower_config(tiny_arch, tmp_path)
    with pytest.raises(ConfigError, match=r"nodes \[1000, 1004\] all claim client "
                                          r"'art_painting'"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)


def test_an_out_of_range_client_index_is_refused_not_clamped(tiny_arch, pacs_like, tmp_path):
    nodes = own_sites(pacs_like, tmp_path)
    nodes[1]["client-index"] = 3
    run_config = flower_config(tiny_arch, tmp_path)
    with pytest.raises(ConfigError, match="node 1001 failed.*client-index 3 is out of range"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)


def test_a_planned_client_that_never_connects_is_refused(tiny_arch, pacs_like, tmp_path):
    nodes = [n for n in own_sites(pacs_like, tmp_path) if n["domain"] != "photo"]
    run_config = flower_config(tiny_arch, tmp_path, **{"discover-timeout": 1.0})
    with pytest.raises(ConfigError, match="only 3 SuperNodes connected.*needs 4"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)


def test_federation_checks_name_every_problem():
    from fedclip.flower.discovery import NodeInfo, check_federation

    cfg = RunConfig.build(heldout="sketch", clients_per_domain=2)

    def node(i, client, role, domain, index=0, dim=512):
        return NodeInfo(i, client, role, domain, index, 10, 3, 3, 16, dim, 100.0)

    nodes = {1: node(1, "photo#0", "train", "photo"), 2: node(2, "photo#0", "train", "photo"),
             3: node(3, "sketch", "train", "sketch"), 4: node(4, "cartoon#5", "train",
                                                              "cartoon", 5, dim=384)}
    problems = " | ".join(check_federation(cfg, nodes, ["art_painting", "cartoon", "photo"]))
    assert "nodes [1, 2] all claim client 'photo#0'" in problems
    assert "node 3 (sketch) says role 'train' but this run holds out 'sketch'" in problems
    assert "client-index 5, out of range 0..1" in problems
    assert "no node holds the held-out domain" in problems
    assert "'art_painting#0'" in problems and "did not answer" in problems
    assert "disagree on the backbone" in problems


def test_runs_that_cannot_work_on_flower_are_refused(tiny_arch, pacs_like, tmp_path):
    nodes = own_sites(pacs_like, tmp_path)
    for algorithm, why in (("local", "sends nothing"), ("zeroshot", "sends nothing")):
        run_config = flower_config(tiny_arch, tmp_path, algorithm=algorithm)
        with pytest.raises(ConfigError, match=f"does not run on Flower.*{why}.*fedclip run"):
            server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)


# --- a server that trusts no client ------------------------------------------------------------
def tamper_train(node_id, change):
    def tamper(node, reply):
        if node == node_id and reply.metadata.message_type == "train" and reply.has_content():
            change(reply.content)
        return reply
    return tamper


def test_a_node_lying_about_its_examples_is_rejected_and_changes_nothing(tiny_arch, pacs_like,
                                                                         tmp_path):
    nodes = own_sites(pacs_like, tmp_path)

    def lie(content):
        content["metrics"] = MetricRecord({**dict(content["metrics"]), "num-examples": 10**9})

    run_config = flower_config(tiny_arch, tmp_path)
    lied = server_main(LocalGrid(build_client_app(), nodes, run_config,
                                 tamper=tamper_train(1000, lie)), run_config)
    rounds = lied["history"][1:]
    assert all("declared at discovery" in r["rejected"]["art_painting"] for r in rounds)
    run_config["out"] = str(tmp_path / "absent")
    absent = server_main(LocalGrid(build_client_app(), nodes, run_config,
                                   drop={1000: {1, 2, 3}}), run_config)
    assert absent["history"][1]["missing"] == ["art_painting"]
    assert max_diff(adapter(tmp_path / "flower/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "absent/sketch/adapter-last.safetensors")) == 0


def _scale_up(content):
    arrays = content["arrays"].to_torch_state_dict()
    content["arrays"] = ArrayRecord({k: v * 1000 for k, v in arrays.items()})


def test_a_scaled_up_update_is_rejected_by_the_norm_rule(tiny_arch, pacs_like, tmp_path):
    nodes = own_sites(pacs_like, tmp_path)
    run_config = flower_config(tiny_arch, tmp_path, rounds=1)
    result = server_main(LocalGrid(build_client_app(), nodes, run_config,
                                   tamper=tamper_train(1001, _scale_up)), run_config)
    assert "from the global parameters" in result["history"][1]["rejected"]["cartoon"]


def test_median_bounds_one_scaled_up_client(tiny_arch, pacs_like, tmp_path):
    """With the norm rule off, aggregation=median keeps every coordinate of the aggregate
    within the honest clients' range, whatever the attacker sends."""
    nodes = own_sites(pacs_like, tmp_path)
    honest = {}

    def tamper(node, reply):
        if reply.metadata.message_type == "train" and reply.has_content():
            if node == 1001:
                _scale_up(reply.content)
            else:
                honest[node] = reply.content["arrays"].to_torch_state_dict()
        return reply

    run_config = flower_config(tiny_arch, tmp_path, rounds=1, aggregation="median",
                               **{"norm-factor": 0.0})
    server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=tamper), run_config)
    final = adapter(tmp_path / "flower/sketch/adapter-last.safetensors")
    for k, v in final.items():
        stack = torch.stack([h[k] for h in honest.values()])
        assert ((v >= stack.min(0).values - 1e-6) & (v <= stack.max(0).values + 1e-6)).all()


def test_metrics_are_accepted_only_for_the_senders_role(tiny_arch, pacs_like, tmp_path):
    """A node's accuracies count only for its role, whichever message carries them (an
    evaluate reply, or a train reply that evaluates the previous round)."""
    nodes = own_sites(pacs_like, tmp_path)

    def tamper(node, reply):
        if node == 1000 and reply.has_content() and "metrics" in reply.content:
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]),
                                                     "heldout-accuracy": 0.99})
        if node == 1001 and reply.has_content() and "metrics" in reply.content:
            metrics = dict(reply.content["metrics"])
            if "val-accuracy" in metrics:
                reply.content["metrics"] = MetricRecord({**metrics, "val-accuracy": 7.0})
        return reply

    run_config = flower_config(tiny_arch, tmp_path, rounds=2)
    faked = server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=tamper),
                        run_config)
    run_config["out"] = str(tmp_path / "honest")
    honest = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    assert [r["heldout_accuracy"] for r in faked["history"]] == [
        r["heldout_accuracy"] for r in honest["history"]]
    assert all("cartoon" not in r["val_accuracy"] for r in faked["history"])


# --- a Flower run as complete as an in-process one ---------------------------------------------
def test_flower_resume_equals_uninterrupted(tiny_arch, pacs_like, tmp_path):
    nodes = own_sites(pacs_like, tmp_path)
    run_config = flower_config(tiny_arch, tmp_path, rounds=4, **{"checkpoint-every": 1})
    full = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)

    class Crash(Exception):
        pass

    sent_train = []

    def interrupt(node, reply):
        if reply.metadata.message_type == "train":
            sent_train.append(node)
            if len(sent_train) > 2 * 3:  # in round 3
                raise Crash
        return reply

    run_config["out"] = str(tmp_path / "cut")
    with pytest.raises(Crash):
        server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=interrupt),
                    run_config)
    with pytest.raises(Exception, match="resume=true"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    resumed = server_main(LocalGrid(build_client_app(), nodes, run_config),
                          {**run_config, "resume": True})
    assert max_diff(adapter(tmp_path / "flower/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "cut/sketch/adapter-last.safetensors")) < 1e-6
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])


def test_server_schedule_reaches_clients_in_both_runtimes(tiny_arch, pacs_like, tmp_path):
    """lr_decay is applied by the server and sent each round: both runtimes agree, and the
    schedule changes the result."""
    nodes = own_sites(pacs_like, tmp_path)
    run_config = flower_config(tiny_arch, tmp_path, **{"lr-decay": 0.5,
                                                      "personalize-epochs": 0})
    grid = LocalGrid(build_client_app(), nodes, run_config)
    server_main(grid, run_config)
    local = in_process(tiny_arch, pacs_like, tmp_path, lr_decay=0.5, personalize_epochs=0)
    assert local["personalized"] is None
    flower_w = adapter(tmp_path / "flower/sketch/adapter-last.safetensors")
    assert max_diff(flower_w, adapter(tmp_path / "local/sketch/adapter-last.safetensors")) < 1e-5
    lrs = [float(m.content["config"]["lr"]) for m in grid.sent
           if m.metadata.message_type == "train"]
    assert lrs[::3] == [1e-3, 5e-4, 2.5e-4]
    in_process(tiny_arch, pacs_like, tmp_path, name="nodecay", personalize_epochs=0)
    assert max_diff(flower_w, adapter(tmp_path / "nodecay/sketch/adapter-last.safetensors")) > 0


def test_every_adapter_file_predicts(tiny_arch, pacs_like, tmp_path):
    """In-process, local per-client, Flower and SecAgg+ adapter files all work in predict."""
    from flwr.app import Context, RecordDict

    from fedclip.flower import secagg
    from fedclip.predict import predict

    nodes = own_sites(pacs_like, tmp_path)
    run_config = flower_config(tiny_arch, tmp_path, rounds=1)
    server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    secure_config = {**run_config, "out": str(tmp_path / "secagg"), "secagg-max-weight": 100.0}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=secure_config)
    secagg.run(LocalGrid(secagg.build_client_app(), nodes, secure_config), context,
               secure_config)
    in_process(tiny_arch, pacs_like, tmp_path, name="inproc")
    in_process(tiny_arch, pacs_like, tmp_path, name="local-algo", algorithm="local")
    files = [tmp_path / "flower/sketch/adapter.safetensors",
             tmp_path / "secagg/sketch/adapter-last.safetensors",
             tmp_path / "secagg/sketch/adapter.safetensors",
             tmp_path / "inproc/sketch/adapter.safetensors",
             tmp_path / "local-algo/sketch/adapter-photo.safetensors"]
    images = sorted((pacs_like / "sketch" / "dog").glob("*.png"))[:3]
    for f in files:
        rows = predict(f, images)
        assert len(rows) == 3 and all(r["class"] in PACS_CLASSES for r in rows), f
    import json

    secure = json.loads((tmp_path / "secagg" / "results.json").read_text())["runs"][0]
    assert secure["runtime"] == "flower-secagg+" and secure["history"][0]["round"] == 0
    assert 0 <= secure["generalization"] <= 1 and secure["zeroshot"]["generalization"] > 0


def test_a_node_rescans_only_when_its_folders_change(tiny_arch, pacs_like, tmp_path,
                                                     monkeypatch):
    """A node keeps its site between messages (no rescan while nothing changed: one stat per
    folder) and rebuilds it when an image was added since the last message."""
    from fedclip.flower import node

    site_config = own_sites(pacs_like, tmp_path)[0]  # art_painting, a training domain
    cfg = RunConfig.build(backbone=tiny_arch, heldout="sketch")
    loads = []
    real = node.load_domain
    monkeypatch.setattr(node, "load_domain", lambda *a, **k: loads.append(a) or real(*a, **k))
    first, _ = node.node_for(cfg, site_config)
    again, _ = node.node_for(cfg, site_config)
    assert len(loads) == 1 and again is first  # unchanged: no rescan, the same site
    folder = tmp_path / "sites" / "art_painting" / "art_painting" / "dog"
    shutil.copy(next(folder.iterdir()), folder / "copy.png")
    changed, _ = node.node_for(cfg, site_config)
    assert len(loads) == 2 and changed.images == first.images + 1
    node.node_for(cfg, site_config)
    assert len(loads) == 2


def _fresh_process(node):  # noqa: ANN001, ANN202
    """What a deployed node's next message sees: a new process, nothing in memory."""
    node._SITES.clear()
    node._DOMAINS.clear()


def test_a_fresh_process_reads_its_site_file_and_notices_changed_data(
        tiny_arch, pacs_like, tmp_path, monkeypatch):
    """A deployed node starts a process per message: it reads its site file (no scan, no
    partition) while the data's fingerprint is unchanged, and rebuilds when an image was
    added, rewritten, or the file is damaged."""
    from fedclip.flower import node

    site_config = own_sites(pacs_like, tmp_path)[0]
    cfg = RunConfig.build(backbone=tiny_arch, heldout="sketch")
    loads = []
    real = node.load_domain
    monkeypatch.setattr(node, "load_domain", lambda *a, **k: loads.append(a) or real(*a, **k))
    _fresh_process(node)
    built, _ = node.node_for(cfg, site_config)
    _fresh_process(node)
    read, _ = node.node_for(cfg, site_config)
    assert len(loads) == 1 and read is not built  # from the file: no scan
    assert (read.name, read.role, read.images, read.folders) == (
        built.name, built.role, built.images, built.folders)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(read.data, part).x, getattr(built.data, part).x)
        assert torch.equal(getattr(read.data, part).y, getattr(built.data, part).y)
    assert torch.equal(read.class_text, built.class_text)
    folder = tmp_path / "sites" / "art_painting" / "art_painting" / "dog"
    image = next(folder.iterdir())
    shutil.copy(image, folder / "copy.png")
    _fresh_process(node)
    assert node.node_for(cfg, site_config)[0].images == built.images + 1 and len(loads) == 2
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    _fresh_process(node)
    node.node_for(cfg, site_config)  # an image rewritten in place: its mtime changed
    assert len(loads) == 3
    path = node.site_file(cfg, Path(site_config["data-root"]), "art_painting", 0)
    path.write_bytes(path.read_bytes()[:100])  # damaged: rebuilt, never trusted
    _fresh_process(node)
    current, _ = node.node_for(cfg, site_config)
    assert len(loads) == 4
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:  # well-formed, with a wrong label type
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file({**tensors, "train.y": tensors["train.y"].float()}, str(path), metadata=header)
    _fresh_process(node)
    assert torch.equal(node.node_for(cfg, site_config)[0].data.train.y, current.data.train.y)
    assert len(loads) == 5
    _fresh_process(node)
    node.node_for(cfg.replace(seed=1), site_config)  # another task: its own split
    assert len(loads) == 6


def test_every_client_of_a_domain_shares_one_scan(tiny_arch, toy_root, tmp_path, monkeypatch):
    """In one process (a simulation's worker) the clients of a domain reuse its scan,
    features and partition: 400 simulated clients cost a scan per domain, not per client."""
    from fedclip.flower import node

    cfg = RunConfig.build(backbone=tiny_arch, data_root=str(toy_root), heldout="gamma",
                          classes=("cat", "dog", "red_car"), clients_per_domain=3,
                          cache_dir=str(tmp_path / "cache"))
    loads = []
    real = node.load_domain
    monkeypatch.setattr(node, "load_domain", lambda *a, **k: loads.append(a[2]) or real(*a, **k))
    _fresh_process(node)
    names = [node.node_for(cfg, {"partition-id": i, "num-partitions": 7})[0].name
             for i in range(7)]
    assert names == ["alpha#0", "alpha#1", "alpha#2", "beta#0", "beta#1", "beta#2", "gamma"]
    assert loads == ["alpha", "beta", "gamma"]
