"""Flower's SecAgg+ workflow, guarded: no client's reply can crash the server.

``flwr.server.workflow.SecAggPlusWorkflow`` reads every stage's replies as the protocol says
they are: an empty reply to ``share_keys`` raises ``KeyError: 'secaggplus_configs'``, garbage
bytes in ``collect_masked_vectors`` raise ``ValueError`` from ``np.load``, a reply naming a
node that was never sampled raises ``KeyError``; the ServerApp dies and no result is written.
:class:`GuardedSecAggPlusWorkflow` runs Flower's own stages unchanged, but every reply first
passes a check of that stage (:func:`setup_problem`, :func:`share_keys_problem`,
:func:`masked_vector_problem`, :func:`unmask_problem`): the keys, types, lengths and node ids
the protocol allows, bounded sizes, and masked vectors whose ``.npy`` header (dtype, shape,
byte length) is read before any array is. A reply that fails is dropped, as if that client had
dropped out: SecAgg+ tolerates that up to its reconstruction threshold. Flower's stages then
see only well-formed replies.

Two more things make a drop-out before the masked vectors survivable (Flower's workflow
otherwise halts, or mis-unmasks): after ``setup`` and ``share_keys`` the sampled nodes and each
node's neighbours are cut to the nodes still active, so that the unmask stage neither asks for
shares of a node that never sent any nor removes pairwise masks that were never added.

What no check can see (SecAgg+ assumes honest-but-curious clients for integrity): a share or
ciphertext of the right form but wrong content. A wrong ciphertext makes its receiver fail
(a drop-out, handled); a wrong share in the unmask stage makes the reconstruction raise (the
round is refused, :meth:`unmask_stage`) or gives a garbage sum, which
:func:`implausible_mean` recognises (a weighted mean of values clipped to the clipping range
lies within it; a wrongly unmasked one almost surely does not).

The workflow tells the strategy what it did through two optional callbacks: ``on_drop(round,
node id, reason)`` for each dropped reply and ``on_refuse(round, reason)`` when a round ends
without an aggregate (fewer answers than the threshold, or shares that do not reconstruct).
Each is also one WARNING line in Flower's log.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore import log

MAX_KEY_BYTES = 4096  # a public key (PEM of an EC key: about 180 bytes)
MAX_CIPHERTEXT_BYTES = 1 << 16  # one encrypted pair of shares (about 300 bytes)
MAX_SHARE_BYTES = 1 << 16  # one Shamir share: 4 bytes of index + 16 per chunk
MAX_NPY_HEADER = 4096  # an .npy header (numpy writes 128 bytes for these arrays)

DropHook = Callable[[int, int, str], None]
RefuseHook = Callable[[int, str], None]


# --- the checks, one per stage (None: the reply is well-formed) --------------------------------
def _configs(msg: Message) -> Any:
    """The SecAgg+ config record of a reply, or None."""
    try:
        records = msg.content.config_records
    except (AttributeError, ValueError):
        return None
    return records.get(RECORD_KEY_CONFIGS)


def _bytes_list(value: Any, limit: int, what: str) -> str | None:
    if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
        return f"{what} is not a list of bytes"
    if any(len(b) > limit for b in value):
        return f"{what} holds more than {limit} bytes"
    return None


def _int_list(value: Any, what: str) -> str | None:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return f"{what} is not a list of node ids"
    if len(set(value)) != len(value):
        return f"{what} names a node twice"
    return None


def setup_problem(msg: Message) -> str | None:
    """A ``setup`` reply: two public keys, distinct, that parse as keys."""
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    cfg = _configs(msg)
    if cfg is None:
        return "no SecAgg+ record in its setup reply"
    keys = [cfg.get(Key.PUBLIC_KEY_1), cfg.get(Key.PUBLIC_KEY_2)]
    if (why := _bytes_list(keys, MAX_KEY_BYTES, "its public keys")) is not None:
        return why
    if keys[0] == keys[1]:
        return "its two public keys are the same"
    for key in keys:
        try:
            bytes_to_public_key(key)
        except Exception:  # noqa: BLE001  (cryptography raises several kinds for bad bytes)
            return "a public key that does not parse"
    return None


def share_keys_problem(msg: Message, expected: set[int]) -> str | None:
    """A ``share_keys`` reply: one ciphertext for each neighbour it was given (``expected``:
    its active neighbours but itself), no other destination."""
    cfg = _configs(msg)
    if cfg is None:
        return "no SecAgg+ record in its share_keys reply"
    dsts, ctxts = cfg.get(Key.DESTINATION_LIST), cfg.get(Key.CIPHERTEXT_LIST)
    if (why := _int_list(dsts, "its destination list")) is not None:
        return why
    if (why := _bytes_list(ctxts, MAX_CIPHERTEXT_BYTES, "its ciphertexts")) is not None:
        return why
    if len(dsts) != len(ctxts):
        return f"{len(dsts)} destinations for {len(ctxts)} ciphertexts"
    if set(dsts) != expected:
        return "its destinations are not the neighbours it was given"
    return None


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int] | str:
    """(shape, dtype, header length) of an ``.npy`` blob from its header alone, or why not."""
    from numpy.lib import format as npy

    buffer = io.BytesIO(data)
    try:
        version = npy.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(buffer,
                                                              max_header_size=MAX_NPY_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(buffer,
                                                              max_header_size=MAX_NPY_HEADER)
        else:
            return f"an .npy version {version} array"
    except (ValueError, TypeError, SyntaxError, EOFError):
        return "bytes that are not an .npy array"
    if fortran or dtype.hasobject:
        return "an .npy array of objects or in Fortran order"
    return tuple(shape), dtype, buffer.tell()


def masked_vector_problem(msg: Message, shapes: list[tuple[int, ...]], mod_range: int
                          ) -> str | None:
    """A ``collect_masked_vectors`` reply: the weight factor and one masked array per
    parameter (``shapes``: ``[(1,), *parameter shapes]``), integers in [0, ``mod_range``),
    each read only after its header says it has that shape and that many bytes; and a fit
    result Flower can read (a number of examples, metrics)."""
    cfg = _configs(msg)
    if cfg is None:
        return "no SecAgg+ record in its masked-vector reply"
    blobs = cfg.get(Key.MASKED_PARAMETERS)
    if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
        return "its masked vector is not a list of arrays"
    if len(blobs) != len(shapes):
        return f"{len(blobs)} masked arrays, not {len(shapes)}"
    for blob, shape in zip(blobs, shapes, strict=True):
        header = _npy_header(blob)
        if isinstance(header, str):
            return f"a masked array of {header}"
        got, dtype, offset = header
        if got != shape:
            return f"a masked array of shape {got}, not {shape}"
        if dtype.kind not in "iu" or dtype.itemsize > 8:
            return f"a masked array of {dtype}, not integers"
        if len(blob) != offset + math.prod(shape) * dtype.itemsize:
            return "a masked array whose bytes do not match its header"
        values = np.load(io.BytesIO(blob), allow_pickle=False)
        if values.size and (int(values.min()) < 0 or int(values.max()) >= mod_range):
            return f"masked values outside [0, {mod_range})"
    try:
        fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
    except (KeyError, TypeError, ValueError, AttributeError):
        return "no fit result beside its masked vector"
    weight = fitres.num_examples  # the client's capped train size: a float (ExactWeights)
    if type(weight) not in (int, float) or not math.isfinite(weight) or weight < 0:
        return "a weight (number of examples) that is not a finite number >= 0"
    return None


def unmask_problem(msg: Message, expected: set[int]) -> str | None:
    """An ``unmask`` reply: one Shamir share (4 + 16k bytes) for each node it was asked about
    (``expected``), no other."""
    cfg = _configs(msg)
    if cfg is None:
        return "no SecAgg+ record in its unmask reply"
    nids, shares = cfg.get(Key.NODE_ID_LIST), cfg.get(Key.SHARE_LIST)
    if (why := _int_list(nids, "its node list")) is not None:
        return why
    if (why := _bytes_list(shares, MAX_SHARE_BYTES, "its shares")) is not None:
        return why
    if len(nids) != len(shares):
        return f"{len(nids)} node ids for {len(shares)} shares"
    if set(nids) != expected:
        return "its shares are not for the nodes it was asked about"
    if any(len(s) < 20 or (len(s) - 4) % 16 for s in shares):
        return "a share that is not 4 + 16k bytes"
    return None


def implausible_mean(arrays: Iterable[np.ndarray], clipping_range: float) -> str | None:
    """Why an unmasked SecAgg+ mean cannot be right, or None: a weighted mean of values
    clipped to [-r, r] lies within it (to the quantization), and a sum unmasked with a wrong
    share is uniform over the modulus, far outside it."""
    limit = clipping_range * (1 + 1e-6) + 1e-6
    for a in arrays:
        a = np.asarray(a)
        if a.size and not (np.isfinite(a).all() and float(np.abs(a).max()) <= limit):
            return (f"the unmasked mean is outside [-{clipping_range:g}, {clipping_range:g}] "
                    f"(a client sent a wrong key share); the global parameters are unchanged")
    return None


# --- the workflow ---------------------------------------------------------------------------
class _Screened:
    """A grid whose ``send_and_receive`` returns only the replies ``check`` passes (from a
    node that was sent a message, one reply each); every other call goes to ``grid``."""

    def __init__(self, grid: Grid, check: Callable[[Message], str | None],
                 drop: Callable[[int, str], None]) -> None:
        self._grid, self._check, self._drop = grid, check, drop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """The grid's replies to ``messages`` that pass the check (dropped ones reported)."""
        messages = list(messages)
        asked = {m.metadata.dst_node_id for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        count = Counter(r.metadata.src_node_id for r in replies)
        kept, dropped = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked:
                continue  # not a node of this round: nobody to drop
            if count[node] > 1:
                why: str | None = "answered twice"
            elif reply.has_error():
                kept.append(reply)  # Flower counts it as a drop-out itself
                continue
            else:
                why = self._check(reply)
            if why is None:
                kept.append(reply)
            elif node not in dropped:
                dropped.add(node)
                self._drop(node, why)
        return kept


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` whose stages read only replies that passed their check
    (a bad one drops its client), that survives drop-outs before the masked vectors, and that
    reports drops and refused rounds (``on_drop``, ``on_refuse``) instead of raising."""

    def __init__(self, num_shares: int | float, reconstruction_threshold: int | float, *,
                 on_drop: DropHook | None = None, on_refuse: RefuseHook | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_shares, reconstruction_threshold, **kwargs)
        self.on_drop, self.on_refuse = on_drop, on_refuse
        self._round = 0
        self._why: str | None = None  # why the current round stopped, when a stage knows

    # --- bookkeeping ------------------------------------------------------------------------
    def _dropper(self, stage: str) -> Callable[[int, str], None]:
        def drop(node: int, why: str) -> None:
            log(WARNING, "SecAgg+ round %s: node %s dropped at %s: %s", self._round, node,
                stage, why)
            if self.on_drop is not None:
                self.on_drop(self._round, node, f"{stage}: {why}")
        return drop

    def _refuse(self, why: str) -> None:
        log(WARNING, "SecAgg+ round %s refused: %s", self._round, why)
        if self.on_refuse is not None:
            self.on_refuse(self._round, why)

    @staticmethod
    def _prune(state: WorkflowState) -> None:
        """Only the nodes still active take part from here: the unmask stage must neither ask
        for shares of a node that sent none nor remove masks never added with it."""
        active = set(state.active_node_ids)
        state.sampled_node_ids = set(active)
        state.nid_to_neighbours = {n: nb & active for n, nb in state.nid_to_neighbours.items()
                                   if n in active}

    def __call__(self, grid: Grid, context: Any) -> None:
        if isinstance(context, LegacyContext):
            cfg = context.state.config_records.get(MAIN_CONFIGS_RECORD)
            self._round = int(cast(int, cfg[WorkflowKey.CURRENT_ROUND])) if cfg else 0
        state = WorkflowState()
        stages = ((self.setup_stage, "setup"), (self.share_keys_stage, "share_keys"),
                  (self.collect_masked_vectors_stage, "collect_masked_vectors"),
                  (self.unmask_stage, "unmask"))
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        for stage, name in stages:
            self._why = None
            if not stage(grid, context, state):
                self._refuse(self._why or f"too few nodes answered its {name} stage for "
                             f"SecAgg+'s reconstruction threshold ({state.threshold}); the "
                             f"global parameters are unchanged")
                return

    # --- the stages -------------------------------------------------------------------------
    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        screened = _Screened(grid, setup_problem, self._dropper("setup"))
        ok = super().setup_stage(cast(Grid, screened), context, state)
        keys = Counter(k for pair in state.nid_to_publickeys.values() for k in pair)
        for node, pair in list(state.nid_to_publickeys.items()):
            if any(keys[k] > 1 for k in pair):  # a replayed key: every neighbour would fail
                self._dropper("setup")(node, "a public key another node also sent")
                state.active_node_ids.discard(node)
                del state.nid_to_publickeys[node]
        self._prune(state)
        return ok and self._check_threshold(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState
                         ) -> bool:
        given = {n: (state.nid_to_neighbours[n] & state.active_node_ids) - {n}
                 for n in state.active_node_ids}

        def check(msg: Message) -> str | None:
            return share_keys_problem(msg, given.get(msg.metadata.src_node_id, set()))

        screened = _Screened(grid, check, self._dropper("share_keys"))
        ok = super().share_keys_stage(cast(Grid, screened), context, state)
        self._prune(state)
        # what was forwarded stays keyed by the nodes now active (Flower built it so)
        return ok and self._check_threshold(state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext,
                                     state: WorkflowState) -> bool:
        params = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        from flwr.common import parameters_to_ndarrays

        shapes = [(1,), *(tuple(a.shape) for a in parameters_to_ndarrays(params))]
        mod_range = state.mod_range

        def check(msg: Message) -> str | None:
            return masked_vector_problem(msg, shapes, mod_range)

        screened = _Screened(grid, check, self._dropper("collect_masked_vectors"))
        return super().collect_masked_vectors_stage(cast(Grid, screened), context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        asked = {n: set(state.nid_to_neighbours[n]) for n in state.active_node_ids}

        def check(msg: Message) -> str | None:
            return unmask_problem(msg, asked.get(msg.metadata.src_node_id, set()))

        screened = _Screened(grid, check, self._dropper("unmask"))
        strategy = context.strategy
        reached: list[bool] = []
        aggregate_fit = strategy.aggregate_fit

        def reconstructed(*args: Any, **kwargs: Any) -> Any:
            reached.append(True)  # past the reconstruction: the strategy's errors are its own
            return aggregate_fit(*args, **kwargs)

        strategy.aggregate_fit = reconstructed  # type: ignore[method-assign]
        try:
            return super().unmask_stage(cast(Grid, screened), context, state)
        except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:
            if reached:
                raise
            self._why = (f"the key shares do not reconstruct the masks ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); a client sent a wrong share")
            return False
        finally:
            del strategy.aggregate_fit  # the class's method again
