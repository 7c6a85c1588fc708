"""Files and inputs a node or a run is given: a site file that is not a regular file, a
read-only site cache, a site key that holds only what changes the site, FedPFT's synthetic
sample bounded by memory, a pickled Hugging Face checkpoint, and options for an algorithm
that is not run."""

from __future__ import annotations

import errno
import os

import pytest

from fedclip.config import RunConfig
from fedclip.errors import ConfigError

CLASSES = ("cat", "dog", "red_car")


def _node_cfg(tiny_arch, toy_root, **extra):  # noqa: ANN001, ANN202
    return RunConfig.build(backbone=tiny_arch, data_root=str(toy_root), heldout="gamma",
                           classes=CLASSES, **extra)


def _counting_loads(monkeypatch):  # noqa: ANN001, ANN202
    from fedclip.flower import node

    loads: list[str] = []
    real = node.load_domain
    monkeypatch.setattr(node, "load_domain",
                        lambda *a, **k: loads.append(a[2]) or real(*a, **k))
    return node, loads


def _fresh_process(node) -> None:  # noqa: ANN001
    node._SITES.clear()
    node._DOMAINS.clear()


NODE = {"partition-id": 0, "num-partitions": 3}


# --- a node's site file -------------------------------------------------------------------
def _node_in(cfg: RunConfig, answer) -> None:  # noqa: ANN001
    """node_for in a forked process; what happened goes to ``answer``."""
    from fedclip.flower import node

    try:
        node.node_for(cfg, NODE)
        answer.put(("ok", ""))
    except Exception as exc:  # noqa: BLE001  (handed to the test)
        answer.put((type(exc).__name__, str(exc)))


def test_a_site_file_that_is_a_fifo_is_refused_at_once(tiny_arch, toy_root):
    """Opening a FIFO to read it blocks until a writer comes (inside safetensors, holding the
    GIL): the node hung, discovery never ended. Refused in one line, without opening it.
    Tried in a forked process that the test ends if it blocks."""
    import multiprocessing

    from fedclip.flower import node

    cfg = _node_cfg(tiny_arch, toy_root)
    path = node.site_file(cfg, toy_root, "alpha", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    child = context.Process(target=_node_in, args=(cfg, answer))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the node blocked on its site file (a FIFO)")
    kind, message = answer.get(timeout=10)
    assert kind == "DataError", (kind, message)
    assert "is not a regular file; remove it" in message and "\n" not in message


def test_a_read_only_site_cache_does_not_stop_the_node(tiny_arch, toy_root, monkeypatch,
                                                       caplog):
    """The cache became read-only after the features were extracted (a mounted cache, a
    full disk): atomic_write raises StorageError (not OSError) for the site file, and the
    node still serves its site, rebuilt from the cached features at each message, as
    documented."""
    import fedclip.io

    node, loads = _counting_loads(monkeypatch)
    cfg = _node_cfg(tiny_arch, toy_root)
    _fresh_process(node)
    node.node_for(cfg, NODE)  # features extracted and cached
    node.site_file(cfg, toy_root, "alpha", 0).unlink()

    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fedclip.io.tempfile, "mkstemp", read_only)
    _fresh_process(node)
    site, _ = node.node_for(cfg, NODE)
    assert site.name == "alpha" and site.data is not None
    assert "could not keep this node's site" in caplog.text
    assert not node.site_file(cfg, toy_root, "alpha", 0).exists()
    _fresh_process(node)
    assert node.node_for(cfg, NODE)[0].name == "alpha"
    assert loads == ["alpha"] * 3  # rebuilt each time, never stopped


def test_the_site_key_holds_only_what_changes_the_site(tiny_arch, toy_root, monkeypatch):
    """Every node rebuilt its site when only `rounds` changed: the key held the whole run
    config. Training, aggregation and privacy settings now reuse the file; the task's
    settings (seed, fractions, classes, backbone) still rebuild it."""
    node, loads = _counting_loads(monkeypatch)
    cfg = _node_cfg(tiny_arch, toy_root)
    _fresh_process(node)
    built = node.node_for(cfg, NODE)[0]
    for changed in (cfg.replace(rounds=7), cfg.replace(lr=1e-3, local_epochs=2),
                    cfg.replace(trust="untrusted"), cfg.replace(algorithm="fedprox"),
                    cfg.replace(personalize_epochs=0, eval_every=3)):
        _fresh_process(node)
        assert node.node_for(changed, NODE)[0].images == built.images
    assert loads == ["alpha"]
    for changed in (cfg.replace(seed=1), cfg.replace(train_fraction=0.5),
                    cfg.replace(prompt_template="a photo of a {}")):
        _fresh_process(node)
        node.node_for(changed, NODE)
    assert len(loads) == 4


# --- FedPFT's synthetic sample ----------------------------------------------------------------
def _mixture_update(classes: int, dim: int, count: int):  # noqa: ANN202
    import torch

    from fedclip.core.client import ClientUpdate

    gen = torch.Generator().manual_seed(classes)
    extras = {"weights": torch.ones(classes, 1), "means": torch.randn(classes, 1, dim,
                                                                      generator=gen),
              "covs": torch.full((classes, 1, dim), 0.01),
              "counts": torch.full((classes,), float(count))}
    return ClientUpdate({}, extras, classes * count, 0.0)


def test_fedpft_refuses_a_synthetic_sample_that_does_not_fit_before_allocating(monkeypatch):
    """samples_per_class=1000000 was accepted and then ended in an allocation traceback on
    the server; now what it needs is said in one line, before anything is drawn."""
    import torch

    from fedclip.algorithms import fedpft, get_algorithm
    from fedclip.algorithms.base import Runtime

    algo = get_algorithm(RunConfig.build(algorithm="fedpft", backbone="standin", options={
        "fedpft": {"samples_per_class": 1_000_000, "server_epochs": 1}}),
        Runtime(logit_scale=100.0))
    free = 512 * 2**20  # 512 MiB left on this server
    monkeypatch.setattr(fedpft, "free_memory", lambda: free)
    drawn = []
    monkeypatch.setattr(fedpft, "sample_mixtures", lambda *a: drawn.append(a))
    current = {"weight": torch.zeros(7, 512)}
    updates = [_mixture_update(7, 512, 10) for _ in range(2)]
    with pytest.raises(ConfigError) as info:
        algo.server.aggregate(current, updates, {})
    message = str(info.value)
    assert message == ("fedpft: 7,000,000 synthetic features of 512 floats need about 13.4 GiB "
                       "of host memory, but 512 MiB are free; lower fedpft.samples_per_class "
                       "(now 1000000)")
    assert drawn == []  # refused before sampling
    # what fits is sampled
    assert fedpft.synthetic_counts(updates, 0) == [20] * 7


def test_fedpft_samples_in_chunks(monkeypatch):
    import torch

    from fedclip.algorithms import fedpft

    monkeypatch.setattr(fedpft, "SAMPLE_CHUNK", 7)
    updates = [_mixture_update(3, 4, 5), _mixture_update(3, 4, 15)]
    out = fedpft.sample_mixtures(updates, 50, torch.Generator().manual_seed(0))
    assert out.x.shape == (150, 4) and torch.isfinite(out.x).all()
    assert torch.bincount(out.y).tolist() == [50, 50, 50]
    assert out.y.tolist() == sorted(out.y.tolist())  # class by class, as before


# --- an hf: folder with a pickled checkpoint --------------------------------------------------
def test_an_hf_folder_with_a_pickled_checkpoint_is_one_line(tmp_path, recwarn):
    """transformers reads pytorch_model.bin with torch.load(weights_only=True), which refuses
    a pickle that would run code, with an UnpicklingError and its traceback; now one line,
    and nothing from the file runs."""
    import pickle

    pytest.importorskip("transformers")  # the hf extra; a dev dependency
    from transformers import CLIPConfig, CLIPModel

    from fedclip.backbones.hf import HfBackbone
    from fedclip.errors import BackboneError

    folder = tmp_path / "clip"
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "vocab_size": 100, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                       "num_hidden_layers": 1, "image_size": 32, "patch_size": 16},
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(BackboneError) as info:
        HfBackbone(str(folder))
    message = str(info.value)
    assert message.startswith(f"hf:{folder}: its weights are a pickle that safe loading refuses")
    assert "\n" not in message and info.value.__cause__ is None
    assert not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


# --- algorithm options in a preset --------------------------------------------------------
@pytest.mark.parametrize(("section", "why"), [
    ("[fedprox]\nmu = true", "fedprox.*mu: Input should be a valid number"),
    ("[fedpft]\nsamples_per_class = 2.0", "fedpft.*samples_per_class: Input should be a valid "
                                           "integer"),
    ("[fedpft]\nhalf = 1", "fedpft.*half: Input should be a valid boolean"),
    ("[fedpft]\nserver_epochs = \"20\"", "fedpft.*server_epochs: Input should be a valid "
                                         "integer"),
])
def test_options_of_an_algorithm_not_run_are_type_checked(tmp_path, section, why):
    """A preset for fedclip that also holds another algorithm's options: a wrongly typed
    value there was coerced (true as 1.0, 2.0 as 2, 1 as a switch, "20" as 20), though the
    configuration says wrongly typed values are always errors."""
    from fedclip.algorithms import get_algorithm

    preset = tmp_path / "run.toml"
    preset.write_text(f'algorithm = "fedclip"\n{section}\n')
    with pytest.raises(ConfigError, match=why) as info:
        get_algorithm(RunConfig.build(preset, backbone="standin"))
    assert "\n" not in str(info.value)


def test_well_typed_options_stay_accepted(tmp_path):
    from fedclip.algorithms import get_algorithm

    preset = tmp_path / "run.toml"
    preset.write_text('algorithm = "fedprox"\n[fedprox]\nmu = 1\n[fedpft]\nhalf = true\n'
                      'samples_per_class = 20\ncovariance = "spherical"\n')
    algorithm = get_algorithm(RunConfig.build(preset, backbone="standin"))
    assert algorithm.options.mu == 1.0  # an integer is a number
