"""The one registry of runtime backends, and the command-line options every command builds from it.

Each backend is one class in one module. The installed package lists them as entry points of the group
``tmanet.backends`` (``setup.py``), so a backend that lives in another package (TensorRT in ``tmanet.engines``,
OpenVINO, a third party's) joins without this module naming it or importing it before it is asked for;
:func:`register_backend` adds one in-process (tests, embedding code).
"""
from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from typing import Callable

from .base import Backend, BackendUnavailable, Option

ENTRY_POINT_GROUP = "tmanet.backends"
DEFAULT_BACKEND = "ort"

# Added in-process by register_backend; entry points are looked up on demand.
BACKENDS: dict[str, Callable[..., Backend]] = {}


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_backend(name: str, factory: Callable[..., Backend]):
    """Make ``factory(export_dir, spec, device, **options) -> Backend`` available as ``name``."""
    BACKENDS[name] = factory
    return factory


def backend_names() -> list[str]:
    """Every backend this installation knows (importable or not), the default first."""
    names = sorted(set(_entry_points()) | set(BACKENDS))
    return sorted(names, key=lambda n: n != DEFAULT_BACKEND)


def get_backend(name: str) -> Callable[..., Backend]:
    """The backend class (or factory) named ``name``; :class:`BackendUnavailable` if its module cannot be
    imported here (a missing optional library), ValueError for an unknown name."""
    if name in BACKENDS:
        return BACKENDS[name]
    found = _entry_points().get(name)
    if found is None:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")
    try:
        return found.load()
    except ImportError as e:
        raise BackendUnavailable(f"the {name} backend is not available here: {e}") from None


def _loadable_backends() -> dict[str, type]:
    """The backend classes whose modules import here (their optional libraries are imported lazily, so this
    is every installed backend in practice)."""
    found = {}
    for name in backend_names():
        try:
            found[name] = get_backend(name)
        except BackendUnavailable:
            continue
    return found


def _options_by_flag(backends: dict) -> dict[str, list[tuple[str, Option]]]:
    by_flag: dict[str, list[tuple[str, Option]]] = {}
    for name, cls in backends.items():
        for opt in getattr(cls, "options", ()):
            by_flag.setdefault(opt.flag, []).append((name, opt))
    return by_flag


def add_backend_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_BACKEND,
                          backend_help: str | None = None) -> None:
    """``--backend`` (the registry's names), ``--device`` and every backend's own options, each once; the help
    of an option says which backends take it. :func:`backend_options` checks them for the chosen backend."""
    backends = _loadable_backends()
    lines = "; ".join(f"{name}: {getattr(cls, 'summary', '') or name}" for name, cls in backends.items())
    parser.add_argument("--backend", choices=backend_names(), default=default, help=backend_help or lines)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the backends that run on a GPU")
    for flag, takers in _options_by_flag(backends).items():
        first = takers[0][1]
        helps = dict.fromkeys(opt.help for _, opt in takers)
        text = (next(iter(helps)) + f" ({', '.join(n for n, _ in takers)})" if len(helps) == 1 else
                "; ".join(f"{n}: {opt.help}" for n, opt in takers))
        if first.is_switch:
            parser.add_argument(flag, dest=_dest(flag), action="store_true", help=text)
        else:
            choices = list(dict.fromkeys(c for _, opt in takers for c in (opt.choices or ()))) or None
            parser.add_argument(flag, dest=_dest(flag), choices=choices, type=first.type, metavar=first.metavar,
                                help=text)


def _dest(flag: str) -> str:
    return "backend_" + flag.lstrip("-").replace("-", "_")


def backend_options(args: argparse.Namespace) -> dict:
    """The options of the chosen ``args.backend`` from the flags :func:`add_backend_arguments` added; a flag
    the chosen backend does not take, or a value it does not accept, is a ValueError in one sentence."""
    chosen = get_backend(args.backend)
    own = {opt.flag: opt for opt in getattr(chosen, "options", ())}
    options = {}
    for flag, takers in _options_by_flag(_loadable_backends()).items():
        given = getattr(args, _dest(flag), None)
        if given is None or given is False:
            continue
        opt = own.get(flag)
        if opt is None:
            names = [n for n, _ in takers]
            needs = {o.needs for _, o in takers}
            who = " and ".join(names) + (" backends" if len(names) > 1 else " backend")
            if len(needs) == 1 and None not in needs:
                raise ValueError(f"{flag} needs {needs.pop()} ({who}); got --backend {args.backend}")
            raise ValueError(f"{flag} applies to the {who} only (got --backend {args.backend})")
        if opt.choices is not None and given not in opt.choices:
            raise ValueError(f"{flag} {given}: the {args.backend} backend takes {', '.join(opt.choices)}")
        options[opt.key] = opt.value if opt.is_switch else given
    return options
