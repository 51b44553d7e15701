"""Pickles read without trusting them: inert stand-ins, restricted unpicklers, field checks.

Some checkpoint files are pickles that name classes of libraries cmd does not import
(DCP's ``Metadata``, DeepSpeed's loss scalers). They are read by an unpickler that
knows an *allow-list*: each qualified name it may meet, mapped to an inert stand-in
(:class:`StandIn`, which records what the pickle passes and runs nothing, or a
:class:`Named` value). Any other global is refused before it is resolved, so no
code named by the file runs and no module is imported. What the stand-ins recorded
is then checked field by field with the validators below, each raising a one-line
:class:`~cmdcli.errors.CheckpointError` that names the file and the field.

Stand-ins pickle back as the classes they stand for (:func:`standin_pickle_module`),
so that a file rewritten by cmd is one its library loads.
"""

from __future__ import annotations

import copyreg
import numbers
import pickle
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..errors import CheckpointError
from ..lazy import torch
from .paths import printable

__all__ = [
    "MAX_DIMS",
    "MAX_INT",
    "Named",
    "StandIn",
    "describe",
    "dims",
    "integer",
    "mapping",
    "restricted_unpickler",
    "sequence",
    "show",
    "standin",
    "standin_pickle_module",
    "text",
]

MAX_DIMS = 64
"""Most dimensions a shape read from a file may have."""
MAX_INT = 1 << 62
"""Sizes, offsets and counts read from a file stay below this (far from int64 overflow)."""


# --------------------------------------------------------------------------- stand-ins


class StandIn:
    """An inert record of one object of a class named in a pickle.

    An unpickler builds one in either of the two ways a pickle can make an object,
    and both only store data: ``REDUCE`` calls the class with the pickled arguments
    (how an ``Enum`` member or a ``torch.Size`` is pickled) and ``NEWOBJ`` + ``BUILD``
    make a bare instance and hand it the pickled state (a dataclass, a loss scaler).
    ``__new__``, ``__init__`` and ``__setstate__`` are the only methods an unpickler can
    reach; they assign three slots and nothing else. Pickling the record again
    (:meth:`__reduce_ex__`) writes the same construction back, under the name of the
    class it stands for (see :func:`standin_pickle_module`).

    Attributes
    ----------
    args : tuple
        The arguments the pickle gave (``(2,)`` for DeepSpeed's ``ZeroStageEnum(2)``).
    state : object
        The state the pickle set (an attribute dict), or None.
    called : bool
        Whether the pickle called the class (``REDUCE``) rather than making a bare
        instance (``NEWOBJ``).
    qualified_name : str
        The class it stands for, ``module.name`` (class attribute).
    kind : str
        A short name of that class, for messages (class attribute).
    """

    __slots__ = ("args", "called", "state")
    qualified_name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __new__(cls, *args: Any) -> StandIn:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        self.called = False
        return self

    def __init__(self, *args: Any) -> None:
        # Reached only when the pickle called the class (REDUCE); NEWOBJ stops at __new__.
        self.called = True

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce_ex__(self, protocol: Any) -> tuple:
        cls = type(self)
        head: tuple = (cls, self.args) if self.called else (copyreg.__newobj__, (cls, *self.args))
        return head if self.state is None else (*head, self.state)

    def __repr__(self) -> str:
        shown = self.args if self.called else self.state
        return f"<stand-in for {self.qualified_name} {printable(repr(shown))[:80]}>"


def standin(
    qualified: str, kind: str | None = None, base: type[StandIn] = StandIn, **attrs: Any
) -> type[StandIn]:
    """A stand-in class for the class ``qualified`` (``module.name``).

    ``kind`` names it in messages (the class name by default); ``base`` is a
    :class:`StandIn` subclass to derive from; ``attrs`` are further class attributes.
    """
    name = qualified.rsplit(".", 1)[-1]
    body = {
        "__slots__": (),
        "qualified_name": qualified,
        "kind": kind or name,
        "__module__": __name__,
        **attrs,
    }
    return type(name, (base,), body)


class Named:
    """A module attribute named in a pickle (a dtype, a storage type): its name only."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"{self.name} cannot be given a state")


def restricted_unpickler(
    allowed: Mapping[str, Any],
    *,
    refuse: Callable[[str, str], Exception],
    persistent_load: Callable[[Any], Any] | None = None,
) -> type[pickle.Unpickler]:
    """An unpickler class that resolves only the names of ``allowed``.

    Parameters
    ----------
    allowed : mapping of str to StandIn subclass or Named
        Qualified name (``module.name``) → what the pickle gets for it. Only
        :class:`StandIn` subclasses and :class:`Named` values may be given: nothing
        that can run code.
    refuse : callable
        ``refuse(module, name)``: the exception raised for any other global.
    persistent_load : callable, optional
        Handles persistent ids; by default a pickle holding one is refused.
    """
    by_parts: dict[tuple[str, str], Any] = {}
    for qualified, value in allowed.items():
        inert = isinstance(value, Named) or (isinstance(value, type) and issubclass(value, StandIn))
        if not inert:
            raise TypeError(f"{qualified}: the allow-list holds {value!r}, not a stand-in")
        module, _, name = qualified.rpartition(".")
        by_parts[(module, name)] = value

    def find_class(self: pickle.Unpickler, module: str, name: str) -> Any:
        value = by_parts.get((module, name))
        if value is None:
            raise refuse(module, name)
        return value

    def refuse_persistent(self: pickle.Unpickler, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent id")

    def load_persistent(self: pickle.Unpickler, pid: Any) -> Any:
        return persistent_load(pid)  # type: ignore[misc]

    return type(
        "RestrictedUnpickler",
        (pickle.Unpickler,),
        {
            "find_class": find_class,
            "persistent_load": refuse_persistent if persistent_load is None else load_persistent,
        },
    )


class _StandInPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The pure-Python pickler, writing stand-in classes under the names they stand for.

    Only ``save_global`` differs: for a stand-in class it writes the ``GLOBAL`` (or
    ``STACK_GLOBAL``) reference the original file had, without looking the name up
    in ``sys.modules`` (nothing is registered there, nothing is imported).
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if not (isinstance(obj, type) and issubclass(obj, StandIn) and obj.qualified_name):
            super().save_global(obj, name)
            return
        module, attr = obj.qualified_name.rsplit(".", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(attr)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode())
        self.memoize(obj)


def standin_pickle_module(standins: Mapping[str, type[StandIn]]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load``/``torch.save`` that keeps stand-ins.

    Loading is full unpickling (only for trusted files), except that the names of
    ``standins`` resolve to them; saving writes every stand-in class back under the
    name it stands for.
    """

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = standins.get(f"{module}.{name}")
            return found if found is not None else super().find_class(module, name)

    module = types.ModuleType("cmdcli_standin_pickle")
    module.Pickler = _StandInPickler  # type: ignore[attr-defined]
    module.Unpickler = _Unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    module.dump = lambda obj, f, protocol=None, **kw: _StandInPickler(  # type: ignore[attr-defined]
        f, protocol, **kw
    ).dump(obj)
    return module


# --------------------------------------------------------------------------- field checks


def describe(value: Any) -> str:
    """What ``value`` is, in a word: a stand-in's kind, a name, or its type."""
    if isinstance(value, StandIn):
        return value.kind
    if isinstance(value, Named):
        return printable(value.name)
    return type(value).__name__


def show(value: Any) -> str:
    """A short, printable rendering of a value read from a file (no repr of containers)."""
    if isinstance(value, str):
        return printable(repr(value[:100]))
    if value is None or type(value) in (int, bool, float):
        return repr(value)[:40]
    return f"a {describe(value)}"


def integer(value: Any, file: str, field: str, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high)``: an integer, or a one-element integer tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value >= high)
    ):
        below = "" if high is None else f" and < {_power(high)}"
        raise CheckpointError(
            f"{file}: {field} must be an integer >= {low}{below}, found {show(value)}"
        )
    return int(value)


def _power(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def text(value: Any, file: str, field: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise CheckpointError(f"{file}: {field} must be a string, found {show(value)}")
    return value


def mapping(value: Any, file: str, field: str, *, optional: bool = False) -> Mapping:
    """``value`` if it is a mapping (``{}`` for None when ``optional``)."""
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{file}: {field} must be a dict, found {show(value)}")
    return value


def sequence(value: Any, file: str, field: str) -> list:
    """``value`` as a list, if it is a list or a tuple."""
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"{file}: {field} must be a list, found {show(value)}")
    return list(value)


def dims(value: Any, file: str, field: str) -> tuple[int, ...]:
    """A shape: a ``torch.Size`` (or its stand-in), a tuple or a list of sizes."""
    if isinstance(value, StandIn) and value.qualified_name == "torch.Size":
        if not value.called or len(value.args) != 1 or value.state is not None:
            raise CheckpointError(f"{file}: {field} must be a torch.Size, found {show(value)}")
        value = value.args[0]
    if not isinstance(value, (torch.Size, tuple, list)) or len(value) > MAX_DIMS:
        raise CheckpointError(f"{file}: {field} must be a shape, found {show(value)}")
    return tuple(integer(d, file, field, high=MAX_INT) for d in value)
