"""Train/val/test splits and client partitions, every one from an explicit seed.

The default split reproduces the FedCLIP reference code exactly: the domain's files in
ImageFolder order, ``np.random.seed(seed); np.random.shuffle(np.arange(n))``, then the first
``int(0.6 n)`` train, the next ``int(0.2 n)`` val and the next ``int(0.2 n)`` test.
``RandomState(seed).shuffle`` draws the same permutation without touching numpy's global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedclip.data.folder import Domain, DomainDataset
from fedclip.errors import DataError


@dataclass(frozen=True)
class ClientSplit:
    """One client's indices into its domain's files (and features)."""

    name: str
    domain: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def reference_split(n: int, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = np.arange(n)
    np.random.RandomState(seed).shuffle(index)
    n_train, n_val, n_test = (int(n * f) for f in fractions)
    return (index[:n_train], index[n_train:n_train + n_val],
            index[n_train + n_val:n_train + n_val + n_test])


def partition(labels: np.ndarray, parts: int, mode: str, alpha: float, seed: int | list[int]
              ) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``parts`` groups, IID or Dirichlet over labels.

    Dirichlet (Hsu et al., 2019): every client draws its label mix ``q ~ Dir(alpha * p)``
    (``p``: the domain's class frequencies) and fills its share of the images (sizes as equal
    as possible, so no client is empty) class by class from ``q``, taking from the classes
    that still have images. Label skew grows as alpha falls (alpha -> inf: IID). Per-class
    Dirichlet splits (Dirichlet over clients for each class) leave most clients empty once
    clients outnumber classes, which is why this form is used."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if parts == 1:
        return [np.arange(n)]
    order = rng.permutation(n)
    if mode == "iid":
        return [np.sort(p) for p in np.array_split(order, parts)]
    classes, counts = np.unique(labels, return_counts=True)
    pools = [list(order[labels[order] == c]) for c in classes]
    left = counts.astype(float)
    prior = counts / counts.sum()
    groups = []
    for size in (len(p) for p in np.array_split(np.arange(n), parts)):
        mix = rng.dirichlet(alpha * prior * len(classes))
        members = []
        for _ in range(size):
            weights = mix * (left > 0)
            if weights.sum() <= 0:  # this client's classes ran out: take from what is left
                weights = left.copy()
            k = int(rng.choice(len(classes), p=weights / weights.sum()))
            members.append(pools[k].pop())
            left[k] -= 1
        groups.append(np.sort(np.asarray(members, dtype=np.int64)))
    return groups


def domain_seed(seed: int, domain: str) -> list[int]:
    """The partition seed of a domain: from its name, never from its position among the
    folders a machine happens to see, so every site computes the same partition."""
    return [seed, *domain.encode()]


def domain_clients(domain: Domain, *, seed: int, fractions: tuple[float, float, float],
                   clients_per_domain: int = 1, mode: str = "iid", alpha: float = 0.5
                   ) -> list[ClientSplit]:
    """One domain's clients: ``clients_per_domain`` parts, each split train/val/test. They
    depend only on (seed, domain name, client index, the domain's own files)."""
    if clients_per_domain > 1 and clients_per_domain > len(domain):
        raise DataError(f"domain {domain.name!r} has {len(domain)} images, too few for "
                        f"{clients_per_domain} clients; lower clients_per_domain")
    parts = partition(domain.labels, clients_per_domain, mode, alpha,
                      domain_seed(seed, domain.name))
    clients = []
    for p_index, members in enumerate(parts):
        train, val, test = reference_split(len(members), seed, fractions)
        name = domain.name if clients_per_domain == 1 else f"{domain.name}#{p_index}"
        if len(train) == 0:
            raise DataError(f"client {name!r} gets no training image: {len(members)} images "
                            f"x train fraction {fractions[0]:g} < 1; raise train_fraction"
                            + (" or lower clients_per_domain" if clients_per_domain > 1
                               else ""))
        clients.append(ClientSplit(name, domain.name, members[train], members[val],
                                   members[test]))
    return clients


def make_clients(dataset: DomainDataset, heldout: str | None, *, seed: int,
                 fractions: tuple[float, float, float], clients_per_domain: int = 1,
                 mode: str = "iid", alpha: float = 0.5) -> list[ClientSplit]:
    """The training clients: every domain but ``heldout`` (see :func:`domain_clients`).
    With one client per domain this is the reference split."""
    if heldout is not None and heldout not in dataset.domains:
        raise DataError(f"unknown held-out domain {heldout!r}; this dataset has "
                        f"{', '.join(dataset.domains)} (or pass 'all')")
    clients = [c for name, domain in dataset.domains.items() if name != heldout
               for c in domain_clients(domain, seed=seed, fractions=fractions,
                                       clients_per_domain=clients_per_domain, mode=mode,
                                       alpha=alpha)]
    if not clients:
        raise DataError(f"no training domains left after holding out {heldout!r}; "
                        f"a dataset needs at least two domains")
    return clients


# --- base-to-novel (protocol=base2novel) ----------------------------------------------------
@dataclass(frozen=True)
class ClassSplit:
    """The base-to-novel split of a dataset's classes (indices in label order): clients
    train and validate on ``base``; ``novel`` is scored on classes no client trained on."""

    base: tuple[int, ...]
    novel: tuple[int, ...]
    seed: int

    def names(self, classes: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(base, novel) class names."""
        return tuple(classes[i] for i in self.base), tuple(classes[i] for i in self.novel)


def class_split(n_classes: int, seed: int) -> ClassSplit:
    """The classes split into base and novel halves: a permutation drawn from ``seed`` alone
    (every site and every run seed computes the same), the first ``ceil(n/2)`` base (CoOp's
    and FedTPG's halves), each half in label order."""
    if n_classes < 2:
        raise DataError(f"protocol=base2novel splits the classes into base and novel halves; "
                        f"this dataset has {n_classes} class; use protocol=all-classes")
    order = np.random.default_rng([seed, *b"base2novel"]).permutation(n_classes)
    cut = (n_classes + 1) // 2
    return ClassSplit(tuple(sorted(int(i) for i in order[:cut])),
                      tuple(sorted(int(i) for i in order[cut:])), seed)


def keep_classes(split: ClientSplit, labels: np.ndarray, classes: tuple[int, ...]
                 ) -> ClientSplit:
    """The client's indices whose images are of ``classes`` (its other images are left out
    of every split)."""
    wanted = np.isin(labels, np.asarray(classes, dtype=np.int64))
    return ClientSplit(split.name, split.domain, *(idx[wanted[idx]] for idx in
                                                   (split.train, split.val, split.test)))
