"""Composed config → validated, typed spec, with every problem reported at once.

OmegaConf's structured-config merge stops at the first bad key and names no file, so the
dataclasses in `schema.py` are checked here by hand: unknown keys (with a did-you-mean),
types, limits, stage kinds, `needs` and cycles, plus each kind's own checks. A problem is
reported against the file (or command-line override) that set the key.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Protocol

import yaml
from omegaconf import DictConfig, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.build import HYDRA_KEYS
from runner.errors import SpecError
from runner.schema import ClusterConfig, Mode, PipelineSpec, RunConfig, StageSpec


@dataclass
class Origins:
    """Where each key of the composed config came from, for messages that name a file and for
    anchoring a spec's relative data paths to the directory the spec lives in."""

    # YAML files by the config package they were merged into ("pipeline", "pipeline.stages.x")
    files: dict[str, Path]
    # command-line overrides as (key, text)
    overrides: list[tuple[str, str]]
    # the config search path's directories (the shipped specs, --config-dir, ...)
    roots: list[Path] = field(default_factory=list)

    def source(self, key: str) -> Path | str:
        """The file that most likely set `key`, or the text of the override that did (the last
        one: it wins)."""
        for okey, text in reversed(self.overrides):
            if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
                return f"command line '{text}'"
        candidates = [p for p in self.files if key == p or key.startswith(p + ".") or p == ""]
        # the including file first: its own keys (after `_self_`) win over its templates'
        for package in sorted(candidates, key=len):
            path = self.files[package]
            rel = key[len(package) + 1 :] if package else key
            if _yaml_has(path, rel):
                return path
        return self.files[candidates[-1]] if candidates else "config"

    def of(self, key: str) -> str:
        """The override or the file that most likely set `key`, for a message."""
        source = self.source(key)
        return _display(source) if isinstance(source, Path) else source

    def base(self, key: str) -> Path:
        """The directory a relative path in `key` is relative to: the search-path root of the
        spec file that set it (`specs/`, `--config-dir`), or the working directory for a path
        given on the command line."""
        source = self.source(key)
        if not isinstance(source, Path):
            return Path.cwd()
        source = source.resolve()
        for root in self.roots:
            if source.is_relative_to(root):
                return root
        return source.parent


def _yaml_has(path: Path, dotted: str) -> bool:
    try:
        node: object = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in dotted.split(".") if dotted else []:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # an entry of a list: `jobs.0.cwd`
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Problems:
    """Collects problems as (key path, message), then raises them all as one SpecError."""

    def __init__(self, origins: Origins | None) -> None:
        self.origins = origins
        self.items: list[tuple[str, str]] = []
        # problems whose message should name the line of the file that set the key
        self.with_line: set[int] = set()
        # the pipeline's stages as written, and those whose own spec is wrong (said already):
        # a stage naming one of those names a stage that is there (`no_such_stage`)
        self.stage_names: list[str] = []
        self.invalid_stages: set[str] = set()

    def add(self, key: str, message: str, *, line: bool = False) -> None:
        if line:
            self.with_line.add(len(self.items))
        self.items.append((key, message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = []
        for n, (key, message) in enumerate(self.items):
            where = self.origins.of(key) if self.origins else "config"
            if n in self.with_line and self.origins:
                source = self.origins.source(key)
                if isinstance(source, Path) and (at := yaml_line(source, key)) is not None:
                    where += f", line {at}"
            lines.append(f"{where}: {key}: {message}")
        raise SpecError(lines)


def yaml_line(path: Path, key: str) -> int | None:
    """The line (1-based) of the last component of `key` in YAML file `path`, if written."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    found: yaml.Node | None = None
    parts = key.split(".")
    # the file may hold the key under any prefix of it (its package): try the longest path
    for start in range(len(parts)):
        found = _find(node, parts[start:])
        if found is not None:
            break
    return None if found is None else found.start_mark.line + 1


def _find(node: yaml.Node | None, parts: list[str]) -> yaml.Node | None:
    """The key node of `parts` (a path of mapping keys) in a composed YAML node, or None."""
    key_node = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            return None
        pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
        if pair is None:
            return None
        key_node, node = pair
    return key_node


@dataclass
class Pipeline:
    """A validated pipeline: stages typed by kind, in an order where needs come first."""

    name: str
    stages: dict[str, StageSpec]
    # each stage's validated keys as written (defaults filled), for fingerprints and diffs
    raw: dict[str, dict[str, object]]


@dataclass
class Spec:
    """Everything `runner` was asked to do, validated."""

    mode: Mode
    run: RunConfig
    cluster: ClusterConfig
    pipeline: Pipeline
    # mode=cancel: the units to cancel in the running run
    units: list[str] = field(default_factory=list)


# a stage kind's own checks (importable targets, existing inputs); it may add implied `needs`
KindCheck = Callable[[str, StageSpec, "Problems", Mapping[str, StageSpec]], None]


class KindSchema(Protocol):
    """What the validator, composition (`compose.py`) and completion (`completion.py`) read of
    a stage kind: its schema, its own checks, and its keys that hold data paths. The CLI hands
    them the kinds' registry (`runner.kind.StageKind` is one), which they never import."""

    @property
    def spec_type(self) -> type[StageSpec]: ...

    @property
    def check(self) -> KindCheck: ...

    # the spec's keys that hold paths, relative to the spec's directory (`*`: every item)
    @property
    def path_keys(self) -> tuple[tuple[str, ...], ...]: ...

    # the keys each of its free-form mappings takes, by path in the stage (`*`: any name)
    @property
    def mapping_keys(self) -> Mapping[tuple[str, ...], tuple[str, ...]]: ...


def did_you_mean(word: str, allowed: Iterable[str]) -> str:
    """'; did you mean 'x'?' when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def unknown_key(key: str, allowed: Iterable[str]) -> str:
    """The message for a key that is not one of `allowed`, with a did-you-mean."""
    allowed = list(allowed)
    return f"unknown key{did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})"


# the keys beside a `_target_` that say how to build it, not arguments to build it with
BUILD_KEYS = HYDRA_KEYS | {"_target_", "_partial_"}


def import_target(target: str) -> tuple[object, str | None]:
    """The object `pkg.mod.attr` (a spec's `_target_`) names and None, or None and why it
    cannot be imported: a module that fails on import is named with its file and line, a
    missing dependency with the package to install."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            return None, _failed_import(module, exc)
        except Exception as exc:  # the module itself fails on import: say where and how
            return None, _failed_import(module, exc)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                return (
                    None,
                    f"module {module!r} has no attribute {attr!r}{did_you_mean(attr, names)}",
                )
            obj = getattr(obj, attr)
        return obj, None
    return None, f"no module named {parts[0]!r}"


def check_target(
    problems: Problems,
    path: str,
    spec: Mapping[str, object],
    missing: str,
    passed: Callable[[object], int] = lambda target: 0,
) -> None:
    """The `_target_` of the mapping at `path` is named, imports, and takes the keys given
    beside it. Without the last check a misspelled keyword passes validation and fails only
    when a Ray worker builds the target, after the run has started. `missing`: what to name
    when there is no target; `passed(target)`: how many positional arguments the runner
    itself gives the target when it calls it (an item, a DataFrame)."""
    target = spec.get("_target_")
    if not isinstance(target, str) or not target:
        problems.add(f"{path}._target_", f"missing: {missing}")
        return
    found, error = import_target(target)
    if error is not None:
        if error == f"no module named {target.split('.')[0]!r}":
            error += _path_hint(target.split(".")[0], problems.origins)
        problems.add(f"{path}._target_", f"= {target!r}: cannot import: {error}")
        return
    for key, message in _argument_problems(target, found, spec, passed(found)):
        problems.add(f"{path}.{key}" if key else path, message)


def _path_hint(module: str, origins: Origins | None) -> str:
    """Where Python looked for a top-level module it did not find, or, for a module in the
    user's spec directory (a `--config-dir`, not on Python's path), how to put it there."""
    for root in origins.roots if origins else []:
        for there in (root / f"{module}.py", root / module / "__init__.py"):
            if there.is_file():
                where = _display(root)
                return (
                    f": {_display(there)} is in the spec directory, which is not on Python's "
                    f"path: run with PYTHONPATH={where} (or move the module to the working "
                    "directory)"
                )
    return f" in the working directory ({Path.cwd()}), on PYTHONPATH or among installed packages"


def _argument_problems(
    name: str, target: object, spec: Mapping[str, object], passed: int
) -> list[tuple[str, str]]:
    """(key, message) for each key of `spec` that `target` cannot take, bound to its signature
    (a class's constructor) after `spec`'s `_args_` and the `passed` positional arguments the
    runner gives it; a key of "" for a call that cannot bind for another reason (too many
    positional arguments) or that leaves a required argument out. Nothing when the signature
    cannot be read (a builtin, a C extension); no key is second-guessed when it takes
    **kwargs. A required argument is not looked for in a `_partial_` target: it gets the rest
    later, from the caller."""
    args = spec.get("_args_", [])
    try:
        signature = inspect.signature(target)  # type: ignore[arg-type]  # any callable
    except (ValueError, TypeError):
        return []
    params = list(signature.parameters.values())
    if not isinstance(args, list | tuple):
        return []
    kwargs = {str(k): v for k, v in spec.items() if k not in BUILD_KEYS}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        try:
            signature.bind_partial(*args, *[None] * passed, **kwargs)
        except TypeError as exc:
            return _unbound(name, params, len(args), passed, kwargs) or [
                ("", f"{name!r} cannot be called as the runner calls it: {exc}")
            ]
    missing = [] if "_partial_" in spec else _unfilled(params, len(args) + passed, kwargs)
    if missing:
        takes = ", ".join(
            f"**{p.name}" if p.kind is p.VAR_KEYWORD else p.name
            for p in params
            if p.kind is not p.VAR_POSITIONAL
        )
        needs = ", ".join(missing)
        return [("", f"{name!r} needs {needs}, which the spec leaves out (it takes: {takes})")]
    return []


def _unfilled(params: list[inspect.Parameter], positional: int, kwargs: Iterable[str]) -> list[str]:
    """The required parameters that neither the first `positional` arguments nor `kwargs`
    fill: a class built with the spec's keys alone fails in every worker, after Ray started."""
    by_position = {p.name for p in params[:positional] if p.kind is not p.KEYWORD_ONLY}
    return [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in by_position
        and p.name not in kwargs
    ]


def _unbound(
    name: str, params: list[inspect.Parameter], given: int, passed: int, kwargs: Iterable[str]
) -> list[tuple[str, str]]:
    """The keys no parameter takes by keyword: unknown names, and names of parameters that
    `_args_` (the first `given`) or the runner (the next `passed`) fill by position."""
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_args = positional[:given]
    by_runner = positional[given : given + passed]
    takes = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in by_args + by_runner
    ]
    allowed = f"(it takes: {', '.join(takes)})" if takes else "(it takes none)"
    found = []
    for key in kwargs:
        if key in by_runner:
            found.append((key, f"{name!r} is given {key!r} by the runner; leave it out {allowed}"))
        elif key in by_args:
            found.append((key, f"{name!r} is given {key!r} by _args_ already {allowed}"))
        elif key not in takes:
            hint = did_you_mean(key, takes)
            found.append((key, f"{name!r} takes no argument {key!r}{hint} {allowed}"))
    return found


def _failed_import(module: str, exc: BaseException) -> str:
    """Where importing `module` failed (its own file and line when known) and why."""
    if isinstance(exc, SyntaxError):
        where = f"{_display(Path(exc.filename))} line {exc.lineno}" if exc.filename else "?"
        return f"module {module!r} has a syntax error at {where}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    # the innermost frame outside the import machinery is the line that failed
    own = [f for f in frames if "importlib" not in f.filename]
    where = f" at {_display(Path(own[-1].filename))} line {own[-1].lineno}" if own else ""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
        return (
            f"module {module!r} imports {exc.name!r}{where}, which is not installed "
            f"(pip install {package}, or the package that provides it)"
        )
    return f"module {module!r} fails on import{where}: {type(exc).__name__}: {exc}"


# the modes that only read a run directory (its ledger, the config each attempt saved): the
# spec's stages are neither resolved nor checked, so a moved input file, or a run started with
# overrides this command lacks (`+...follow=true`), does not stop them
READING = frozenset({Mode.status, Mode.report, Mode.cancel})


def load(cfg: DictConfig, kinds: Mapping[str, KindSchema], origins: Origins | None = None) -> Spec:
    """Validate a composed config against the schemas of `kinds` (the stage kinds by name);
    raise one SpecError listing every problem."""
    problems = Problems(origins)
    reading = _mode_of(cfg) in READING
    data = _resolve(cfg, problems, reading)
    problems.raise_if_any()
    mode = _enum(Mode, data.get("mode", "run"), "mode", problems)
    run = build(RunConfig, data.get("run"), "run", problems)
    cluster = build(ClusterConfig, data.get("cluster"), "cluster", problems)
    if reading:
        pipeline = _named(data.get("pipeline"), problems)
    else:
        pipeline = _pipeline(data.get("pipeline"), kinds, problems)
    units = data.get("units") or []
    if not isinstance(units, list) or not all(isinstance(u, str | int) for u in units):
        problems.add("units", f"= {units!r}: expected a list of unit names, e.g. units=[a,b]")
        units = []
    for key in set(data) - {"mode", "run", "cluster", "pipeline", "units", "hydra"}:
        problems.add(key, unknown_key(key, ["cluster", "mode", "pipeline", "run", "units"]))
    problems.raise_if_any()
    assert mode is not None and run is not None and cluster is not None and pipeline is not None
    return Spec(
        mode=mode,
        run=run,
        cluster=cluster,
        pipeline=pipeline,
        units=[str(u) for u in units],
    )


def _mode_of(cfg: DictConfig) -> Mode | None:
    """The mode the config asks for, or None when it names none that exists (`load` says
    why)."""
    try:
        return Mode(OmegaConf.select(cfg, "mode", default="run"))
    except (OmegaConfBaseException, ValueError):
        return None


def _resolve(cfg: DictConfig, problems: Problems, reading: bool = False) -> dict[str, object]:
    """The config as plain data, interpolations resolved; `reading`: of the pipeline only its
    name (see READING)."""
    try:
        if reading:
            read = {str(k): _plain(cfg, str(k)) for k in cfg if k != "pipeline"}
            read["pipeline"] = {"name": _plain(cfg, "pipeline.name")}
            data: object = read
        else:
            data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "config"
        # OmegaConf appends full_key / object_type lines: the first line says what is wrong
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        value = _raw_value(cfg, str(key))
        written = f"= {value!r}: " if value is not None else ""
        problems.add(str(key), f"{written}cannot resolve: {what}", line=True)
        return {}
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def _plain(cfg: DictConfig, key: str) -> object:
    """The value at `key`, resolved, as plain data."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    return value


def _named(data: object, problems: Problems) -> Pipeline | None:
    """The pipeline by its name alone, for a mode that reads a run (see READING)."""
    named = data if isinstance(data, dict) else {}
    head = build(PipelineSpec, {**named, "stages": {}}, "pipeline", problems)
    return None if head is None else Pipeline(head.name, {}, {})


def _raw_value(cfg: DictConfig, key: str) -> object:
    """The unresolved text of `key` (`${...}`), or None."""
    node: Node | None = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        found = node._get_node(part)
        node = found if isinstance(found, Node) else None
    return node._value() if node is not None else None


def _pipeline(data: object, kinds: Mapping[str, KindSchema], problems: Problems) -> Pipeline | None:
    if not isinstance(data, dict):
        problems.add("pipeline", "missing: choose one with pipeline=NAME")
        return None
    head = build(PipelineSpec, {**data, "stages": {}}, "pipeline", problems)
    stages_data = data.get("stages") or {}
    if not isinstance(stages_data, dict) or not stages_data:
        problems.add("pipeline.stages", "a pipeline needs at least one stage")
        return None
    stages: dict[str, StageSpec] = {}
    raw: dict[str, dict[str, object]] = {}
    problems.stage_names = [str(n) for n in stages_data]
    for name, stage_data in stages_data.items():
        anchor_paths(f"pipeline.stages.{name}", stage_data, problems.origins, kinds)
        built = _stage(str(name), stage_data, kinds, problems)
        if built is not None:
            stages[str(name)], raw[str(name)] = built
        else:
            problems.invalid_stages.add(str(name))
    for name, stage in stages.items():
        kinds[stage.kind].check(name, stage, problems, stages)
    _check_needs(stages, problems)
    if head is None or len(stages) != len(stages_data):
        return None
    order = _topological(stages)
    if order is None:
        return None
    return Pipeline(head.name, {n: stages[n] for n in order}, {n: raw[n] for n in order})


def _stage(
    name: str, data: object, kinds: Mapping[str, KindSchema], problems: Problems
) -> tuple[StageSpec, dict[str, object]] | None:
    path = f"pipeline.stages.{name}"
    if not isinstance(data, dict):
        problems.add(path, f"= {data!r}: expected a mapping with at least `kind`")
        return None
    kind = data.get("kind")
    if kind not in kinds:
        allowed = ", ".join(sorted(kinds))
        hint = did_you_mean(str(kind), kinds) if isinstance(kind, str) else ""
        what = "missing stage kind" if kind is None else f"= {kind!r}: unknown stage kind"
        problems.add(f"{path}.kind", f"{what}{hint} (allowed: {allowed})")
        return None
    stage = build(kinds[str(kind)].spec_type, data, path, problems)
    if stage is None:
        return None
    assert isinstance(stage, StageSpec)
    raw = {f.name: getattr(stage, f.name) for f in fields(stage)}
    return stage, raw


def anchor_paths(
    path: str, data: object, origins: Origins | None, kinds: Mapping[str, KindSchema]
) -> None:
    """Make a stage's relative data paths (its kind's `path_keys`: a file, a glob pattern, a
    directory) absolute, in place: relative to the directory of the spec that wrote them (see
    `Origins.base`), so a spec runs the same from any directory; without origins (no Hydra),
    relative to the working directory."""
    if not isinstance(data, dict) or (kind := kinds.get(str(data.get("kind")))) is None:
        return
    for keys in kind.path_keys:
        for parent, key, where in _walk(data, keys, path):
            value = parent.get(key)
            if not isinstance(value, str) or not value:
                continue
            expanded = Path(value).expanduser()
            if not expanded.is_absolute():
                # asked by the entry's own key (`jobs.0.cwd`): an override of another key of
                # the list (`jobs.0.script=...`) leaves its paths the spec file's
                base = origins.base(where) if origins else Path.cwd()
                expanded = base / expanded
            parent[key] = str(expanded)


def _walk(
    node: object, keys: tuple[str, ...], at: str
) -> Iterator[tuple[dict[str, object], str, str]]:
    """The (mapping, key, its dotted key path from `at`) triples `keys` reaches in `node`;
    `*` stands for every list entry."""
    if not keys:
        return
    head, rest = keys[0], keys[1:]
    children: list[tuple[object, object]] = []
    if head == "*" and isinstance(node, list):
        children = list(enumerate(node))
    if head != "*" and isinstance(node, dict):
        if not rest:
            yield node, head, f"{at}.{head}"
            return
        children = [(head, node.get(head))]
    for step, child in children:
        yield from _walk(child, rest, f"{at}.{step}")


def _check_needs(stages: Mapping[str, StageSpec], problems: Problems) -> None:
    for name, stage in stages.items():
        for need in stage.needs:
            if need == name:
                problems.add(f"pipeline.stages.{name}.needs", "a stage cannot need itself")
            elif need not in stages:
                no_such_stage(problems, f"pipeline.stages.{name}.needs", need, name, stages)
    # a stage that needs itself is said above, not again as a cycle of one
    cycle = find_cycle(
        {n: [d for d in s.needs if d in stages and d != n] for n, s in stages.items()}
    )
    if cycle:
        first = cycle[0]
        problems.add(f"pipeline.stages.{first}.needs", f"dependency cycle: {' -> '.join(cycle)}")


def no_such_stage(
    problems: Problems, key: str, named: str, by: str, stages: Mapping[str, StageSpec]
) -> None:
    """Stage `by` names `named` at `key`, which is not one of the valid `stages`: a problem,
    with the stages there are, unless `named` is a stage whose own spec is wrong (its problem
    is said already; a second one here would send the user looking for a stage that exists)."""
    if named in problems.invalid_stages:
        return
    others = [s for s in (problems.stage_names or stages) if s != by]
    problems.add(
        key,
        f"= {named!r}: no such stage{did_you_mean(named, others)} (stages: {', '.join(others)})",
    )


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle in `graph` (node → the nodes it needs) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def _topological(stages: Mapping[str, StageSpec]) -> list[str] | None:
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(stages):
        ready = [n for n, s in stages.items() if n not in done and set(s.needs) <= done]
        if not ready:
            return None
        order.extend(ready)
        done.update(ready)
    return order


T = typing.TypeVar("T")


def build(cls: type[T], data: object, path: str, problems: Problems) -> T | None:
    """Check `data` against dataclass `cls` field by field.

    Bad optional values are reported and replaced by their defaults, so later checks still
    run and every problem is reported at once; None when a required key is missing or bad."""
    if not isinstance(data, dict):
        problems.add(path, f"= {data!r}: expected a mapping")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    # other spellings of a key users bring from the system a stage replaces (`aliases`)
    spelt = {a: f.name for f in known.values() for a in f.metadata.get("aliases", ())}
    for key in data:
        if key not in known and key not in spelt:
            problems.add(f"{path}.{key}", unknown_key(str(key), sorted(known)))
    values: dict[str, object] = {}
    complete = True
    for name, f in known.items():
        required = f.default == "???" or (f.default is MISSING and f.default_factory is MISSING)
        value = _given(name, data, spelt, path, problems)
        if value == "???":
            if required:
                problems.add(f"{path}.{name}", "missing required key")
                complete = False
            continue
        value = _coerce(hints[name], value)
        error = _check(hints[name], value, dict(f.metadata))
        if error:
            problems.add(f"{path}.{name}", f"= {value!r}: {error}")
            complete = complete and not required
            continue
        values[name] = value
    return cls(**values) if complete else None


def _given(
    name: str, data: Mapping[str, object], spelt: dict[str, str], path: str, problems: Problems
) -> object:
    """The value `data` gives field `name`, under its name or one alias ("???" when none);
    both spellings given is reported, and the field's own name wins."""
    value = data.get(name, "???")
    for alias in (a for a, n in spelt.items() if n == name and a in data):
        if value != "???":
            problems.add(f"{path}.{alias}", f"another spelling of {name}: give one of them")
            continue
        value = data[alias]
    return value


def _coerce(tp: object, value: object) -> object:
    """Numbers and booleans written as strings (`${oc.env:N}` gives strings) become typed, and
    numbers in a list of strings become strings (an argv `[--tp_size, 2]`, as R2R's flags are
    written), as OmegaConf's structured configs would convert them."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if isinstance(value, list) and list[str] in options:
        return [str(v) if _is_int(v) or isinstance(v, float) else v for v in value]
    if not isinstance(value, str):
        return value
    if bool in options and value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        if kind in options:
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def _check(tp: object, value: object, limits: Mapping[str, object]) -> str | None:
    """Why `value` does not fit type `tp` and `limits`, or None when it does."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        return None if type(None) in options else f"expected {_describe(tp)}, not null"
    errors = []
    for option in options:
        if option is type(None):
            continue
        error = _check_one(option, value, limits)
        if error is None:
            return None
        errors.append(error)
    # a wrong type is reported as such; a right type with a bad value reports the limit
    limit_errors = [e for e in errors if not e.startswith("expected")]
    return limit_errors[0] if limit_errors else f"expected {_describe(tp, limits)}"


def _check_one(tp: object, value: object, limits: Mapping[str, object]) -> str | None:
    """Why `value` does not fit the one type `tp` (an option of a union) and `limits`;
    "expected" alone when its type is wrong."""
    if tp is object:  # anything goes (a job of a list, checked by its kind)
        return None
    if tp in (bool, int, float):
        return _check_number(tp, value, limits)
    if tp is str:
        return _check_str(value, limits)
    if isinstance(tp, type) and issubclass(tp, Enum):
        allowed = [m.value for m in tp]
        return None if value in allowed else f"not one of {', '.join(allowed)}"
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        ok = isinstance(value, list) and all(_check_one(item_tp, v, {}) is None for v in value)
        return None if ok else "expected"
    if origin is dict:
        return None if isinstance(value, dict) else "expected"
    raise TypeError(f"schema type {tp!r} is not supported by the validator")


def _check_number(tp: object, value: object, limits: Mapping[str, object]) -> str | None:
    """A boolean, an integer (not a boolean) or a number (an integer too), within `limits`."""
    if tp is bool:
        return None if isinstance(value, bool) else "expected"
    numeric = _is_int(value) or (tp is float and isinstance(value, float))
    return _limits(value, limits) if numeric else "expected"


def _check_str(value: object, limits: Mapping[str, object]) -> str | None:
    """A string, one of the field's `choices` when it has them, not blank when `nonempty`."""
    if not isinstance(value, str):
        return "expected"
    if limits.get("nonempty") and not value.strip():
        return "must not be empty"
    choices = _choices(limits)
    if choices and value not in choices:
        hint = did_you_mean(value, choices)
        return f"not one of {', '.join(choices)}{hint}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limits(value: object, limits: Mapping[str, object]) -> str | None:
    """Which of the field's limits a number breaks (a number's type was checked before)."""
    if not isinstance(value, int | float):
        return None
    ge, gt, le = (_bound(limits, key) for key in ("ge", "gt", "le"))
    if ge is not None and value < ge:
        return f"must be >= {ge}"
    if gt is not None and value <= gt:
        return f"must be > {gt}"
    if le is not None and value > le:
        return f"must be <= {le}"
    return None


def _bound(limits: Mapping[str, object], key: str) -> float | None:
    """A field's numeric limit `key` (`ge`, `gt`, `le`), or None when it has none."""
    bound = limits.get(key)
    return bound if isinstance(bound, int | float) else None


def _choices(limits: Mapping[str, object] | None) -> list[str]:
    """The strings a field allows (`choices`), empty when any string goes."""
    choices = limits.get("choices") if limits else None
    return [str(c) for c in choices] if isinstance(choices, list) else []


def _describe(tp: object, limits: Mapping[str, object] | None = None) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    parts = []
    for option in typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,):
        if option is type(None):
            parts.append("null")
        elif option is str and _choices(limits):
            parts.extend(repr(c) for c in _choices(limits))
        elif option in names:
            parts.append(names[option])
        elif typing.get_origin(option) is list:
            parts.append("a list of strings" if option == list[str] else "a list")
        elif typing.get_origin(option) is dict:
            parts.append("a mapping")
        elif isinstance(option, type) and issubclass(option, Enum):
            parts.append(" | ".join(m.value for m in option))
        else:
            parts.append(str(option))
    return " or ".join(parts)


def _enum(enum: type[Mode], value: object, path: str, problems: Problems) -> Mode | None:
    try:
        return enum(value)
    except ValueError:
        allowed = [m.value for m in enum]
        hint = did_you_mean(str(value), allowed)
        problems.add(path, f"= {value!r}: not one of {', '.join(allowed)}{hint}")
        return None
