"""Hydra composition with the schema's defaults in it.

OmegaConf has no unions keyed on a field, so a stage cannot be typed by its `kind:` in a
structured config, and a key its YAML omits would need `++` to be overridden. Between
composing the defaults list and applying the command-line overrides, every stage gets its
kind's defaults under what its YAML wrote (and `cluster` and `run` theirs): every documented
key is then overridable as `KEY=VALUE`, and `--cfg job` shows every effective value. A
`pipeline.stages.NAME.kind=K` override picks K's defaults; `+KEY=VALUE` still adds a key.

A YAML syntax error in a spec, and an override of a key that is not there (a misspelt
`pipeline.stages.square.num_workrs=3`), are each reported as one line: the file, line and
column, or the key with a did-you-mean among the keys that are there. So are an override
Hydra's grammar rejects (`KEY=[1`, `KEY` with no `=`) and a config group given what is not one
name (`pipeline=3`, `pipeline=[demo,jobs]`): Hydra's own messages name no override, or end in
a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import IConfigRepository
from hydra._internal.hydra import Hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from runner.schema import ClusterConfig, RunConfig
from runner.spec import KindSchema, did_you_mean, unknown_key


def defaults_of(cls: type) -> dict[str, object]:
    """The fields of dataclass `cls` that have a default, with it (required ones left out)."""
    out: dict[str, object] = {}
    for f in fields(cls):
        if f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        elif f.default is not MISSING and f.default != "???":
            out[f.name] = f.default
    return out


def fill_defaults(
    cfg: DictConfig, overrides: list[Override], kinds: Mapping[str, KindSchema]
) -> None:
    """Put the schema's defaults (each stage's from its kind in `kinds`) under the composed
    values of `cfg`, in place."""
    # stages whose kind an override picks
    picked = {
        o.key_or_group.split(".")[2]: str(o.value())
        for o in overrides
        if not o.is_delete()
        and o.key_or_group.startswith("pipeline.stages.")
        and o.key_or_group.count(".") == 3
        and o.key_or_group.endswith(".kind")
    }
    # `+KEY=VALUE` adds a key: leave those out, so that it still works as it did
    added = {o.key_or_group for o in overrides if o.is_add()}
    with open_dict(cfg):
        for key, schema in (("run", RunConfig), ("cluster", ClusterConfig)):
            if isinstance(cfg.get(key), DictConfig):
                _under(cfg[key], defaults_of(schema), key, added)
        pipeline = cfg.get("pipeline")
        # a pipeline file that is not a mapping (a list) is the spec check's to name
        stages = pipeline.get("stages") if isinstance(pipeline, DictConfig) else None
        if not isinstance(stages, DictConfig):
            return
        for name, stage in stages.items_ex(resolve=False):
            if not isinstance(stage, DictConfig):
                continue
            kind = kinds.get(str(picked.get(str(name), stage.get("kind"))))
            if kind is not None:
                path = f"pipeline.stages.{name!s}"
                _under(stage, defaults_of(kind.spec_type), path, added, kind.spec_type)


def _under(
    node: DictConfig,
    defaults: dict[str, object],
    path: str,
    skip: set[str],
    cls: type | None = None,
) -> None:
    """Add each default `node` (at `path`) lacks; what the YAML wrote always wins, under its
    own name or another spelling of it (a field's `aliases` in `cls`)."""
    spelt = {f.name: f.metadata.get("aliases", ()) for f in fields(cls)} if cls else {}
    for key, value in defaults.items():
        if key in node or f"{path}.{key}" in skip:
            continue
        if not any(alias in node for alias in spelt.get(key, ())):
            node[key] = value


def declared_key(
    override: Override, cfg: DictConfig, kinds: Mapping[str, KindSchema]
) -> Override | None:
    """`override` as an addition (`+KEY=VALUE`) when it sets a key that its mapping, a
    free-form one of a stage (a role, a roles stage's `pg_pool`), lacks and that the stage's
    kind declares for it (`mapping_keys`): a documented key the YAML leaves out; else None."""
    if override.is_add() or override.is_force_add() or override.is_delete():
        return None
    parts = override.key_or_group.split(".")
    node: object = cfg
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    if not isinstance(node, DictConfig) or parts[-1] in node:
        return None
    if parts[-1] not in (_declared(parts[:-1], cfg, kinds) or ()):
        return None
    return dataclasses.replace(override, type=OverrideType.ADD)


def _declared(
    at: list[str], cfg: DictConfig, kinds: Mapping[str, KindSchema]
) -> tuple[str, ...] | None:
    """The keys the mapping at `at` takes, where it is a free-form mapping of a stage whose
    kind declares them (`mapping_keys`, `*` matching any name); else None."""
    if len(at) < 4 or at[:2] != ["pipeline", "stages"]:
        return None
    stage = OmegaConf.select(cfg, f"pipeline.stages.{at[2]}", default=None)
    kind = kinds.get(str(stage.get("kind"))) if isinstance(stage, DictConfig) else None
    if kind is None:
        return None
    inner = at[3:]
    for pattern, keys in kind.mapping_keys.items():
        if len(pattern) != len(inner):
            continue
        if all(p in ("*", k) for p, k in zip(pattern, inner, strict=True)):
            return keys
    return None


def missing_key(
    override: Override, cfg: DictConfig, kinds: Mapping[str, KindSchema] | None = None
) -> str | None:
    """Why `override` cannot set or delete its key, when a mapping on its path lacks the next
    key, or a mapping it gives (`KEY={a: 1}`) has a key the mapping at KEY lacks: `command
    line 'TEXT': KEY: unknown key; did you mean ...? (allowed: ...)`, else None (not a missing
    key: Hydra's own message stands). A stage's free-form mapping whose keys its kind (in
    `kinds`) declares is named with those."""
    if override.is_add() or override.is_force_add():
        return None
    node: object = cfg
    parts = override.key_or_group.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
            continue
        if not isinstance(node, DictConfig):
            return None  # a value on the way, or a list without that entry: Hydra's message
        if part not in _keys(node, parts[:depth]):
            declared = _declared(parts[:depth], cfg, kinds) if kinds else None
            line = override.input_line or ""
            return _unknown(override, node, parts[: depth + 1], line, declared=declared)
        node = node._get_node(part)
    value = override.value()
    if isinstance(value, dict) and isinstance(node, DictConfig) and not override.is_delete():
        return _missing_inside(override, node, parts, value)
    return None


def _missing_inside(
    override: Override, node: DictConfig, parts: list[str], value: Mapping[str, object]
) -> str | None:
    """The first key of the mapping `value`, given to the mapping `node` at `parts`, that
    `node` (or a mapping below it) lacks, named as `missing_key` names one."""
    for key, inner in value.items():
        path = [*parts, str(key)]
        if str(key) not in _keys(node, parts):
            return _unknown(override, node, path, f"{'.'.join(path)}=...", _replacing(override))
        child = node._get_node(str(key))
        if isinstance(inner, dict) and isinstance(child, DictConfig):
            found = _missing_inside(override, child, path, inner)
            if found is not None:
                return found
    return None


def _replacing(override: Override) -> str:
    """`; KEY={...} merges into the mapping there, ~KEY '+KEY={...}' replaces it`: a mapping
    given whole is merged key by key, so a pool's `items={range: 9}` keeps the spec's `file`
    and its `worker={_target_: ...}` the spec's worker arguments; replacing it takes both."""
    key = override.key_or_group
    text = (override.input_line or "").split("=", 1)[-1]
    return f"; {key}={{...}} merges into the mapping there, ~{key} '+{key}={text}' replaces it"


def _keys(node: DictConfig, at: list[str]) -> list[str]:
    """The keys of the mapping at `at`, as a user may override them (`hydra` is Hydra's)."""
    return [str(k) for k in node if at or k != "hydra"]


def _unknown(
    override: Override,
    node: DictConfig,
    path: list[str],
    added: str,
    replace: str = "",
    declared: tuple[str, ...] | None = None,
) -> str:
    """`command line 'TEXT': KEY: unknown key ...` for the key at `path` that the mapping
    `node` lacks; where the schema does not fix that mapping's keys, `+ADDED adds it`, after
    `replace` (how a mapping given whole replaces the one there) when given; where its
    stage's kind does (`declared`), those are the keys allowed."""
    if declared is not None:
        message = unknown_key(path[-1], declared)
        return f"command line '{override.input_line}': {'.'.join(path)}: {message}"
    at, keys = path[:-1], sorted(_keys(node, path[:-1]))
    where = ".".join(at) or "the config"
    message = unknown_key(path[-1], keys) if keys else f"unknown key ({where} is empty)"
    stage = len(at) == 3 and at[:2] == ["pipeline", "stages"]
    if not (stage or ".".join(at) in _SCHEMA_MAPPINGS or override.is_delete()):
        message += f"{replace}; +{added} adds it"
    return f"command line '{override.input_line}': {'.'.join(path)}: {message}"


# the mappings whose keys the schema fixes (and every stage's own: `pipeline.stages.NAME`); a
# key missing from any other mapping (a worker's arguments, a job's env) may be added with `+`
_SCHEMA_MAPPINGS = frozenset({"", "run", "cluster", "pipeline", "pipeline.stages"})


def yaml_error(exc: BaseException) -> str | None:
    """`FILE, line L, column C: what is wrong` for a YAML syntax error (here or in its causes),
    or None when `exc` is not one."""
    while exc is not None and not isinstance(exc, yaml.YAMLError):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return None if exc is None else f"YAML syntax error: {exc}"
    mark = exc.problem_mark
    what = exc.problem or "syntax error"
    if exc.context and exc.context_mark is not None:
        start = exc.context_mark
        what += f" ({exc.context} that starts at line {start.line + 1}, column {start.column + 1})"
    return f"{_display(mark.name)}, line {mark.line + 1}, column {mark.column + 1}: {what}"


def missing_option(exc: MissingConfigException, overrides: list[str]) -> str | None:
    """`command line 'GROUP=NAME': no GROUP 'NAME'; did you mean ...? (available: ...)` for a
    config group option that is on no search path (`pipeline=nope`; a defaults list's choice
    is named as one), or None when `exc` is not one (Hydra's own message stands)."""
    group, _, name = (exc.missing_cfg_file or "").rpartition("/")
    if not group or exc.options is None:
        return None
    options = sorted(exc.options)
    hint = did_you_mean(name, options)
    here = _nearby(group, name)
    mine = (
        f"{here / group / name}.yaml is there: add --config-dir {here}"
        if here is not None
        else f"one of your own: --config-dir DIR with DIR/{group}/{name}.yaml"
    )
    given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group]
    where = f"command line '{given[-1]}'" if given else f"{_listing(exc)}: {group}: {name}"
    return f"{where}: no {group} '{name}'{hint} {_available(group, options)}; {mine}"


def _nearby(group: str, name: str) -> Path | None:
    """The working directory, or a directory in it, that holds `GROUP/NAME.yaml` (as it is
    written on the command line): the spec the user wrote, without the `--config-dir` that
    names where it is."""
    try:
        places = [Path("."), *sorted(Path(".").iterdir())]
    except OSError:  # a working directory that cannot be listed: no hint
        return None
    for place in places:
        with contextlib.suppress(OSError):  # a directory this user may not read
            if (place / group / f"{name}.yaml").is_file():
                return place
    return None


def _listing(exc: MissingConfigException) -> str:
    """`defaults list of pipeline/NAME.yaml`: the file whose defaults list chose the missing
    option (Hydra's message opens with `In 'pipeline/NAME':`), or `defaults list` when it is
    the runner's own config or not said."""
    parent = re.match(r"In '([^']+)':", str(exc))
    if parent is None or parent[1] == "config":
        return "defaults list"
    return f"defaults list of {parent[1].lstrip('/')}.yaml"


def _available(group: str, options: list[str]) -> str:
    """`(available: A, B)`: the options of config group `group`, for a message."""
    return f"(available: {', '.join(sorted(options))})" if options else f"(no {group} is defined)"


# how an override is written, for a message about one that is not (the grammar's own words
# are ANTLR's: `no viable alternative at input`, `missing EQUAL at '<EOF>'`)
_FORMS = "a list: KEY=[a,b]; a value with spaces, commas or brackets in quotes: KEY='...'"
_LEXER = "LexerNoViableAltException: "


def unparsable(exc: OverrideParseException) -> str:
    """`command line 'TEXT': cannot be parsed: why; expected KEY=VALUE (...)` for an override
    Hydra's grammar rejects (Hydra's own message does not say which one, and ends in a hint at
    a traceback)."""
    text = exc.override
    lines = exc.message.splitlines() or [""]
    if "=" not in text:
        why = "no '=' in it"
    elif lines[0].startswith(_LEXER) and len(lines) > 1 and "^" in lines[1]:
        # Hydra marks the character the lexer stopped at with a caret under the override
        column = lines[1].index("^") - len(_LEXER)
        what = repr(text[column]) if 0 <= column < len(text) else "character"
        why = f"unexpected {what} at column {column + 1}"
    else:
        why = lines[1] if lines[0].startswith("Error parsing override") else lines[0]
        why = why.split(" expecting {")[0]  # the grammar's whole set of tokens tells no user
    return f"command line '{text}': cannot be parsed: {why}; expected KEY=VALUE ({_FORMS})"


# the primary config's config groups that pick one file each (its help says so: "choose one
# of each"): a list would merge several into one, which Hydra allows for any group
ONE_NAME = frozenset({"pipeline", "cluster"})


def listed_choices(overrides: list[str]) -> list[Override]:
    """The overrides that give a group of ONE_NAME a list (`pipeline=[demo,jobs]`: Hydra
    composes both files into one pipeline, in a run and in each job of a sweep alike). Only an
    override of such a group with a bracket in it is parsed, so a run pays nothing for this."""
    listed = [o for o in overrides if "[" in o and o.split("=", 1)[0].strip() in ONE_NAME]
    if not listed:
        return []
    parsed = OverridesParser.create().parse_overrides(listed)
    return [o for o in parsed if isinstance(o.value(), list)]


def not_one_name(override: Override, options: list[str]) -> str:
    """`command line 'pipeline=[demo,jobs]': pipeline takes one name, not a list (...)`."""
    group = override.key_or_group
    value = override.value()
    names = ",".join(map(str, value)) if isinstance(value, list) else "A,B"
    merged = f"a list would merge those files into one {group}"
    each = f"to run each: runner -m {group}={names}"
    where = f"command line '{override.input_line}'"
    known = _available(group, options)
    return f"{where}: {group} takes one name, not a list ({merged}); {each} {known}"


def bad_override(overrides: list[Override], repo: IConfigRepository, why: str = "") -> str | None:
    """Why one of `overrides` cannot be applied, when it is one Hydra fails on (its message
    `why`) with a bare ValueError (a traceback) or a message naming no override: one with no
    key (`=3`), a config group given what is not a name (`pipeline=3`, `pipeline=null`,
    `~cluster=1`), or a group the config chooses already given with `+` or `++`
    (`+pipeline=jobs`, for which Hydra suggests a defaults-list line); None for any other
    (Hydra's own message stands)."""
    for override in overrides:
        given = override.input_line or ""
        where = f"command line '{given}'"
        if not override.key_or_group:
            return f"{where}: no key before '='; expected KEY=VALUE, e.g. pipeline=demo"
        value = override.value()
        group = override.key_or_group
        chosen_twice = override.is_add() and why.startswith(f"Multiple values for {group}.")
        if chosen_twice or (override.is_force_add() and repo.group_exists(group)):
            chosen = f"{group} is chosen already; to choose another: {given.lstrip('+')}"
            return f"{where}: {chosen} {_available(group, repo.get_group_options(group))}"
        if override.is_sweep_override() or (value is None and override.is_delete()):
            continue
        if isinstance(value, str | dict) or (isinstance(value, list) and not override.is_delete()):
            continue  # a name, a mapping (sets keys, not a choice), a list of names
        if repo.group_exists(group):
            typed = given.partition("=")[2]
            options = _available(group, repo.get_group_options(group))
            return f"{where}: {group} takes the name of a {group} file, not {typed} {options}"
    return None


def _display(name: str) -> str:
    path = Path(name)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return name


def _bad(message: str) -> int:
    """Hydra would print a traceback for any exception: print the message alone, exit 2."""
    print(f"runner: error: invalid spec: {message}", file=sys.stderr)
    return 2


_installed = False


# on the search path of the runner's own config (runner/conf/config.yaml), and no other app's
RUNNER_SPECS = "pkg://runner.specs"
# where that config is: on the loader's search path for the runner's compositions only
RUNNER_CONF = "pkg://runner.conf"


def install(kinds: Mapping[str, KindSchema]) -> None:
    """Hook into Hydra's composition, once: `fill_defaults` (with the schemas of `kinds`, the
    stage kinds by name, read at each composition) between the defaults list and the
    overrides, and YAML syntax errors as one line naming file, line and column (Hydra offers
    no public hook for either; hydra-core is pinned to 1.3)."""
    global _installed
    if _installed:
        return
    _installed = True
    apply_overrides = ConfigLoaderImpl._apply_overrides_to_config
    load = ConfigLoaderImpl._load_configuration_impl

    def apply(overrides: list[Override], cfg: DictConfig) -> None:
        if RUNNER_SPECS not in (OmegaConf.select(cfg, "hydra.searchpath") or []):
            apply_overrides(overrides, cfg)  # another Hydra app's config, in this process
            return
        fill_defaults(cfg, overrides, kinds)
        for override in overrides:  # one at a time: each sees the keys the ones before added
            try:
                apply_overrides([override], cfg)
            except ConfigCompositionException:
                added = declared_key(override, cfg, kinds)
                if added is not None:  # a documented key the YAML left out
                    apply_overrides([added], cfg)
                    continue
                message = missing_key(override, cfg, kinds)
                if message is None:
                    raise
                if os.environ.get("RUNNER_FULL_ERROR"):
                    traceback.print_exc()
                full = "RUNNER_FULL_ERROR=1 shows Hydra's own error"
                raise SystemExit(_bad(f"{message} ({full})")) from None

    def load_reporting_yaml(
        self: ConfigLoaderImpl,
        config_name: str | None,
        overrides: list[str],
        run_mode: RunMode,
        from_shell: bool = True,
        validate_sweep_overrides: bool = True,
    ) -> DictConfig:
        ours = any(e.path == RUNNER_CONF for e in self.config_search_path.get_path())
        try:
            listed = listed_choices(overrides) if ours else []
            if listed:  # Hydra would compose them all
                _, repo = self._parse_overrides_and_create_caching_repo(config_name, overrides)
                group = listed[0].key_or_group
                raise SystemExit(_bad(not_one_name(listed[0], repo.get_group_options(group))))
            cfg = load(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
            if ours and isinstance(cfg.get("pipeline"), ListConfig):
                raise SystemExit(_bad(not_a_mapping(cfg)))
            # Hydra resolves its output directory (from run.dir, pipeline.name) outside any
            # error handling of ours: a bad interpolation there would end in a traceback
            for key in ("hydra.run.dir", "hydra.sweep.dir"):
                try:
                    OmegaConf.select(cfg, key)
                except OmegaConfBaseException as exc:
                    what = str(exc).splitlines()[0]
                    hint = "(built from run.dir and pipeline.name)"
                    raise SystemExit(_bad(f"{key} {hint}: cannot resolve: {what}")) from None
            return cfg
        except MissingConfigException as exc:
            message = missing_option(exc, overrides) if ours else None
            if message is None:  # another Hydra app's (in this process), or not an option
                raise
            raise SystemExit(_bad(message)) from None
        except Exception as exc:
            message = yaml_error(exc)
            if message is None and ours:
                message = _override_error(self, exc, config_name, overrides)
            if message is None:
                raise
            raise SystemExit(_bad(message)) from None

    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply)  # type: ignore[method-assign]
    ConfigLoaderImpl._load_configuration_impl = load_reporting_yaml  # type: ignore[method-assign]
    Hydra.get_mode = _get_mode  # type: ignore[method-assign]


def not_a_mapping(cfg: DictConfig) -> str:
    """`pipeline/NAME.yaml: ...` for a pipeline file that holds a list, which Hydra composes
    as one, and whose first use (the output directory's `${pipeline.name}`) fails on."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.pipeline", default=None)
    where = f"pipeline/{choice}.yaml" if choice else "pipeline"
    return f"{where}: a pipeline holds a mapping (name: ..., stages: ...), not a list"


def _override_error(
    loader: ConfigLoaderImpl, exc: Exception, config_name: str | None, overrides: list[str]
) -> str | None:
    """The override that `exc`, raised while `loader` composed the runner's config, is about,
    with what is wrong with it and what it takes; None when it is about none of them."""
    if isinstance(exc, OverrideParseException):
        return unparsable(exc)
    if not isinstance(exc, ValueError | ConfigCompositionException):
        return None
    # parsed once more, as Hydra did (a failed composition only: a run pays nothing for it)
    parsed, repo = loader._parse_overrides_and_create_caching_repo(config_name, overrides)
    return bad_override(parsed, repo, str(exc))


# Hydra's own `get_mode`, which `_get_mode` replaces
_hydra_get_mode = Hydra.get_mode


def _get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> RunMode | None:
    """Hydra composes the whole config twice per run: once only to read `hydra.mode`, once to
    run. The runner's config never sets `hydra.mode`; unless the command line does (`-m`, or
    a `hydra.mode=` override), the answer is "not set" (a plain run) without the first one."""
    if {"-m", "--multirun"} & set(sys.argv[1:]) or any("hydra.mode" in o for o in overrides):
        mode: RunMode | None = _hydra_get_mode(self, config_name, overrides)
        return mode
    return None
