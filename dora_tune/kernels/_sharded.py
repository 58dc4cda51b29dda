"""What a norm cache must look at besides a tensor's own version counter: the FSDP2 shard it was gathered from.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands a module's forward the *unsharded* parameter: one tensor object
per parameter for the whole run, whose storage it frees after the forward and refills by an all-gather before the
next one — **without** bumping its version counter (``_unsafe_preserve_version_counter``), and often at the same
address (the CUDA caching allocator reuses the block). ``optimizer.step()``, ``load_state_dict`` and ``.copy_`` act on
the *sharded* parameter, whose counter they bump. A cache keyed on the unsharded tensor's identity, address and
version would return a norm of the weights before the step; keyed also on the sharded parameter's counter, it cannot.

The link unsharded → sharded is FSDP2's own bookkeeping (``torch.distributed._composable_state``, the states' param
groups): read only when a cache meets new tensors while an FSDP2 state exists. Where it cannot be read (another
torch version's layout), :func:`source_versions` never compares equal — the cache recomputes at every call, which
is PEFT's behaviour and always correct.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch

#: sources of tensors FSDP2 manages but whose shard could not be found: every version read differs from the last
UNREADABLE = "unreadable"


def _mapping() -> Any:
    """torch's table module → weak reference to its composable-API state, or None / empty when no module was
    sharded (``fully_shard`` imports its module: nothing is imported here)."""
    mod = sys.modules.get("torch.distributed._composable_state")
    return getattr(mod, "_module_state_mapping", None) if mod is not None else None


def _states() -> list[Any]:
    """The live composable-API states of this process (FSDP2's among them)."""
    mapping = _mapping()
    if not mapping:
        return []
    return [s for s in (ref() for ref in list(mapping.values())) if s is not None]


def fsdp_in_use() -> bool:
    """Whether a module of this process is sharded by FSDP2 (a live composable state with parameter groups): one
    dictionary lookup when none is (FSDP2 not imported, or no module sharded)."""
    mapping = _mapping()
    if not mapping:
        return False
    # stops at the first FSDP2 state (the weak dictionary guards its own iteration against entries dying)
    return any((state := ref()) is not None and _param_groups(state) is not None for ref in mapping.values())


def _param_groups(state: Any) -> list[Any] | None:
    """An FSDP2 state's parameter groups (torch ≥ 2.12 keeps a list, earlier versions one group or None); None for
    a state of another composable API (``replicate``, ``checkpoint``) or a layout this code does not know."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if isinstance(groups, list):
        return groups
    if hasattr(state, "_fsdp_param_group"):
        group = state._fsdp_param_group
        return [] if group is None else [group]
    return None


def _scan(states: list[Any]) -> tuple[dict[int, tuple[Any, Any]], bool]:
    """Every gathered FSDP2 parameter of ``states``: its storage address → (weak ref to the unsharded parameter, weak
    ref to the sharded one); and whether a state looked like FSDP2's but could not be read."""
    found: dict[int, tuple[Any, Any]] = {}
    unreadable = False
    for state in states:
        groups = _param_groups(state)
        if groups is None:
            unreadable = unreadable or "fsdp" in type(state).__name__.lower()
            continue
        for group in groups:
            for fp in getattr(group, "fsdp_params", None) or ():
                full, shard = getattr(fp, "_unsharded_param", None), getattr(fp, "sharded_param", None)
                if full is None or shard is None:
                    continue
                storage = full.untyped_storage()
                if storage.nbytes():  # allocated (gathered): its address is the one the caller's tensors show
                    found[storage.data_ptr()] = (weakref.ref(full), weakref.ref(shard))
    return found, unreadable


class ShardIndex:
    """Storage address → the FSDP2 shard gathered there, for callers that meet aliases of the gathered parameters
    (a compiled graph's views; :class:`~dora_tune.kernels.norm.SharedNormCache`): one scan of FSDP2's states,
    repeated only when a tensor's address is not in it. An entry counts only while its unsharded parameter's storage
    is allocated at that address (the allocator hands freed addresses to other gathers)."""

    __slots__ = ("_by_ptr", "_unreadable")

    def __init__(self) -> None:
        self._by_ptr: dict[int, tuple[Any, Any]] = {}
        self._unreadable = False

    def _lookup(self, tensors: Sequence[torch.Tensor], final: bool) -> tuple[Any, ...] | None:
        out = []
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr() if storage.nbytes() else None
            hit = self._by_ptr.get(ptr) if ptr is not None else None
            full = hit[0]() if hit is not None else None
            if full is not None and full.untyped_storage().nbytes() and full.untyped_storage().data_ptr() == ptr:
                out.append(hit[1])
            elif not final and ptr is not None:
                return None  # not known (yet): scan again
            else:
                out.append(UNREADABLE if self._unreadable and ptr is not None else None)
        return tuple(out)

    def sources(self, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...] | None:
        """For each tensor, a weak reference to the FSDP2 sharded parameter whose all-gather its storage holds
        (None: not one FSDP2 gathers); None when no composable state exists at all (the common case: one
        dictionary lookup). A tensor FSDP2 may manage but whose shard cannot be read gets :data:`UNREADABLE`.
        Matched by storage address, so views and aliases of the unsharded parameter match too."""
        states = _states()
        if not states:
            return None
        out = self._lookup(tensors, final=False)
        if out is None:
            self._by_ptr, self._unreadable = _scan(states)
            out = self._lookup(tensors, final=True)
        return out


def fsdp_sources(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...] | None:
    """:meth:`ShardIndex.sources` by a fresh scan: for a caller that asks once per set of tensors (a layer's
    :class:`~dora_tune.nn.layer.NormCache`, whose tensors keep their identity across gathers)."""
    return ShardIndex().sources(tensors)


def source_versions(sources: tuple[Any, ...] | None) -> Any:
    """The sharded parameters' version counters for :func:`fsdp_sources`' answer (compare with ``==``): None for
    None; a fresh object — equal to nothing — where a source is unreadable or was freed."""
    if sources is None:
        return None
    out = []
    for src in sources:
        if src is None:
            out.append(None)
            continue
        shard = None if src is UNREADABLE else src()
        if shard is None:
            return object()
        out.append(shard._version)
    return tuple(out)
