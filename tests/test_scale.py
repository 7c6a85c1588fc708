"""Many clients, cheaply: partial participation, Dirichlet partitions with guarantees, the
configured device, batched multi-client training equal to the sequential loop."""

import numpy as np
import pytest
import torch

from fedclip.algorithms.registry import names as algorithm_names
from fedclip.config import RunConfig
from fedclip.data.splits import partition
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from fedclip.sampling import sample_clients
from tests.conftest import as_written
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
server_main = as_written(_server_main)


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
    # the nodes not sampled in a round evaluate in its exchange: the same records
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["best_round"] == local["best_round"]


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


class DeviceSpy:
    """Records where the trainable module and its inputs are while a client trains."""

    def __init__(self):
        self.seen = set()

    def install(self, monkeypatch):
        from fedclip.algorithms.base import ClientSide

        real = ClientSide.embed

        def embed(algorithm, module, x):
            if module is not None and module.training:
                self.seen.add((next(module.parameters()).device.type, x.device.type))
            return real(algorithm, module, x)

        monkeypatch.setattr(ClientSide, "embed", embed)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_training_runs_on_the_configured_device(tiny_arch, toy_root, tmp_path, monkeypatch,
                                                 device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here; CI has none")
    spy = DeviceSpy()
    spy.install(monkeypatch)
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                          rounds=1, device=device, personalize_epochs=1)
    r = run(cfg, tmp_path / device)[0]
    assert spy.seen == {(device, device)}
    assert 0 <= r["generalization"] <= 1


def test_a_precision_change_misses_the_cache(tiny_arch, toy_root, tmp_path):
    from fedclip.task import prepare

    base = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma")
    fp32 = prepare(base)
    assert not any(f.from_cache for f in fp32.features.values())
    again = prepare(base)
    assert all(f.from_cache for f in again.features.values())
    bf16 = prepare(base.replace(precision="bf16"))
    assert not any(f.from_cache for f in bf16.features.values())  # never reuses fp32 features
    a, b = fp32.features["alpha"].features, bf16.features["alpha"].features
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.99 and not torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ["fedclip", "fedprox"])
@pytest.mark.parametrize("loss", ["clip", "ce"])
def test_training_clients_together_equals_the_sequential_loop(algorithm, loss):
    """Uneven client sizes (1 to 65 samples), last batches of size 1 (skipped by the
    contrastive loss, used by cross-entropy), two local epochs."""
    from fedclip.adapters import build_adapter, get_params
    from fedclip.algorithms import get_algorithm
    from fedclip.algorithms.base import ClientJob
    from fedclip.core.client import Split
    from fedclip.core.together import train_together

    cfg = RunConfig.build(algorithm=algorithm, loss=loss, batch_size=32, local_epochs=2,
                          lr=1e-2, **{"fedprox.mu": 0.5} if algorithm == "fedprox" else {})
    algo = get_algorithm(cfg)
    gen = torch.Generator().manual_seed(0)
    d, classes = 16, 4
    text = torch.nn.functional.normalize(torch.randn(classes, d, generator=gen), dim=-1)
    start = get_params(build_adapter(d, seed=1))

    def jobs():
        out = []
        for i, n in enumerate((1, 7, 33, 64, 65)):
            split = Split(torch.randn(n, d, generator=torch.Generator().manual_seed(i)),
                          torch.randint(0, classes, (n,),
                                        generator=torch.Generator().manual_seed(10 + i)))
            out.append(ClientJob(f"c{i}", split, start, start, {}, algo.round_config(3), {},
                                 text, 20.0, seed=100 + i))
        return out

    sequential = [algo.client.train_client(job) for job in jobs()]
    for together in (train_together(algo.client, jobs()),  # a CPU's: one client at a time
                     train_together(algo.client, jobs(), vectorised=True)):  # CUDA's: vmap
        _close_to(sequential, together)
    assert sequential[0].steps == (0 if loss == "clip" else 2)  # one sample: skipped or used


def _close_to(sequential, together):  # noqa: ANN001, ANN202
    for a, b in zip(sequential, together, strict=True):
        assert a.steps == b.steps and a.num_examples == b.num_examples
        assert max((a.params[k] - b.params[k]).abs().max().item() for k in a.params) < 1e-5
        assert (a.loss != a.loss and b.loss != b.loss) or abs(a.loss - b.loss) < 1e-5


@pytest.mark.parametrize("algorithm", ["fedclip", "fedprox"])
def test_a_federation_trained_together_equals_the_sequential_one(algorithm, tiny_arch,
                                                                 toy_root, tmp_path):
    from safetensors.torch import load_file

    base = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                           rounds=2, lr=1e-3, clients_per_domain=2, personalize_epochs=0,
                           algorithm=algorithm)
    one = run(base, tmp_path / "seq")[0]
    two = run(base.replace(train_clients_together=True), tmp_path / "together")[0]
    a = load_file(tmp_path / "seq" / "gamma" / "adapter-last.safetensors")
    b = load_file(tmp_path / "together" / "gamma" / "adapter-last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert [r["heldout_accuracy"] for r in one["history"]] == [
        r["heldout_accuracy"] for r in two["history"]]


def test_device_decoding_is_close_to_the_pil_path_and_cached_apart(tiny_arch, tmp_path):
    """The batched decode/resize path (here on the CPU; nvJPEG on a GPU) against PIL."""
    from PIL import Image

    from fedclip.task import prepare

    root = tmp_path / "jpegs"
    gen = np.random.default_rng(0)
    for domain in ("alpha", "beta"):
        for cls in ("cat", "dog"):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for k in range(3):
                size = (48 + 8 * k, 40 + 4 * k)  # uneven sizes: resized per image
                pix = np.clip(gen.normal(120 + 60 * (cls == "dog"), 30, (*size[::-1], 3)),
                              0, 255).astype(np.uint8)
                Image.fromarray(pix).save(folder / f"{k}.jpg", quality=95)
            (folder / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    cfg = RunConfig.build(data_root=str(root), backbone=tiny_arch, heldout="beta",
                          extract_workers=0)
    pil = prepare(cfg.replace(extract_decode="cpu"))
    dev = prepare(cfg.replace(extract_decode="device"))
    assert not any(f.from_cache for f in dev.features.values())  # its own cache key
    for d in ("alpha", "beta"):
        a, b = pil.features[d], dev.features[d]
        assert torch.equal(a.valid, b.valid) and int(a.valid.sum()) == 6
        cos = torch.nn.functional.cosine_similarity(a.features[a.valid], b.features[b.valid])
        assert cos.min() > 0.98


# these encode the prompts on cfg.device themselves
TEXT_FROM_BACKBONE = {"promptfl", "promptfolio", "fedpgp", "fedtpg", "fedotp", "fedmaple"}


@pytest.mark.parametrize("algorithm", sorted(set(algorithm_names()) - TEXT_FROM_BACKBONE))
def test_class_embeddings_stay_on_the_device_of_the_class_features(tiny_arch, algorithm):
    """What a GPU run found: the CNN baselines' identity 'class embeddings' were made on the
    CPU, so scoring on a GPU failed (mat2 on cpu). The meta device stands in for a GPU."""
    from fedclip.algorithms import get_algorithm
    from fedclip.algorithms.base import Runtime

    text = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1).to("meta")
    algo = get_algorithm(RunConfig.build(algorithm=algorithm, backbone=tiny_arch),
                         Runtime(("a cat", "a dog", "a car"), text))
    module = algo.build_module(32)
    out = algo.client.class_text(module.to("meta") if module is not None else None, text)
    assert out.device.type == "meta"


def test_clients_trained_together_again_equal_a_first_time_bit_for_bit():
    """The leaves and Adam moments kept between rounds start as fresh ones would: a second
    call with other clients (fewer of them, other sizes) gives the bits of a first call, and
    leaves the first call's updates as they were."""
    from fedclip.adapters import build_adapter, get_params
    from fedclip.algorithms import get_algorithm
    from fedclip.algorithms.base import ClientJob
    from fedclip.core.client import Split
    from fedclip.core.together import train_together

    cfg = RunConfig.build(algorithm="fedprox", loss="ce", batch_size=8, lr=1e-2,
                          **{"fedprox.mu": 0.5})
    d, classes = 16, 4
    text = torch.nn.functional.normalize(torch.randn(classes, d), dim=-1)

    def jobs(algo, sizes, seed):
        start = get_params(build_adapter(d, seed=seed))
        gen = torch.Generator().manual_seed(seed)
        return [ClientJob(f"c{i}", Split(torch.randn(n, d, generator=gen),
                                         torch.randint(0, classes, (n,), generator=gen)),
                          start, start, {}, algo.round_config(2), {}, text, 20.0, seed=i)
                for i, n in enumerate(sizes)]

    fresh = get_algorithm(cfg)
    first = train_together(fresh.client, jobs(fresh, (3, 9, 17), seed=2))
    used = get_algorithm(cfg)
    before = train_together(used.client, jobs(used, (5, 8, 30, 2, 11), seed=1))
    kept = [{k: v.clone() for k, v in u.params.items()} for u in before]
    again = train_together(used.client, jobs(used, (3, 9, 17), seed=2))
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        assert a.loss == b.loss and a.steps == b.steps
    # the slots' trained tensors are handed out: the earlier call's updates are their own
    for u, k in zip(before, kept, strict=True):
        assert all(torch.equal(u.params[n], k[n]) for n in k)
