"""Finding, loading and validating recipes, with `--set key=value` overrides.

Every problem in a file is reported at once with its field path, the YAML line where there is one,
and a "did you mean" for unknown keys. Raises :class:`RecipeError` (a UsageError, exit 2).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from elmctl._files import MAX_RECIPE_BYTES, UnreadableFile, read_text_bounded
from elmctl.config.schema import FieldProblems, Recipe
from elmctl.errors import UsageError

__all__ = [
    "Problem",
    "RecipeError",
    "recipes_dir",
    "user_recipe_dirs",
    "available_recipes",
    "resolve_recipe_path",
    "load_recipe",
    "recipe_from_dict",
    "parse_overrides",
    "validate_files",
    "MAX_SHOWN_PROBLEMS",
]

# A message lists at most this many problems, then "... and N more": a file with a million unknown
# keys is one screen of output, not a million lines. RecipeError.problems keeps them all.
MAX_SHOWN_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    source: str  # file path, "--set", or "<dict>"
    field: str  # dotted path, "" for the whole file
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line else "")
        return f"{where}: {self.field or '(recipe)'}: {self.message}"


class RecipeError(UsageError):
    """Every problem found (``problems``); the message shows the first :data:`MAX_SHOWN_PROBLEMS`."""

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems = problems
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in recipe:"
        shown = [f"  {p}" for p in problems[:MAX_SHOWN_PROBLEMS]]
        if n > MAX_SHOWN_PROBLEMS:
            shown.append(f"  ... and {n - MAX_SHOWN_PROBLEMS} more")
        super().__init__(
            head + "\n" + "\n".join(shown),
            hint or "fix the fields above; `elmctl recipe schema` lists every field and its range",
        )


def recipes_dir() -> Path:
    """The recipes shipped inside the package (``elmctl/recipes``; the repository's ``recipes/`` links there)."""
    return Path(__file__).resolve().parents[1] / "recipes"


def user_recipe_dirs() -> list[Path]:
    """The user's own recipe folders: ``$ELMCTL_RECIPES`` (one folder, or several joined by ``os.pathsep``)."""
    env = os.environ.get("ELMCTL_RECIPES", "")
    return [Path(part).expanduser() for part in env.split(os.pathsep) if part.strip()]


def available_recipes() -> dict[str, Path]:
    """Recipe id -> file (``openelm-<id>.yaml`` or ``<id>.yaml``).

    Lookup order: the user's folders (``$ELMCTL_RECIPES``, first folder first), then the recipes
    shipped with elmctl; a user's recipe with a shipped id takes its place.
    """
    found: dict[str, Path] = {}
    for folder in [*user_recipe_dirs(), recipes_dir()]:
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem.removeprefix("openelm-"), path)
    order = {"270m": 0, "450m": 1, "1_1b": 2, "3b": 3}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))


def resolve_recipe_path(spec: str | os.PathLike) -> Path:
    """An id (`450m`) or a path to a YAML file -> the file."""
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.is_file():
        return path
    known = available_recipes()
    key = spec_s.lower().replace("openelm-", "").replace(".", "_") if not spec_s.endswith((".yaml", ".yml")) else None
    if key in known:
        return known[key]
    if key == "1b":
        return known.get("1_1b", path)
    if spec_s.endswith((".yaml", ".yml")) or os.sep in spec_s:
        raise UsageError(f"recipe file not found: {spec_s}", "check the path, or use a recipe id")
    close = difflib.get_close_matches(spec_s.lower(), list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(
        f"unknown recipe '{spec_s}'",
        f"{hint}known recipes: {', '.join(known) or '(none found in ' + str(recipes_dir()) + ')'}; "
        "or give a path to a YAML file",
    )


# --------------------------------------------------------------------------------------------
# YAML with line numbers

# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as a string because it lacks a dot.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and refuses aliases.

    Aliases (`*name`) can build self-referencing or exponentially large documents; a recipe
    never needs them, so they are an error with a line number rather than a hang or a crash.
    """

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not supported in recipes", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_object(self, node, deep=False):  # type: ignore[override]
        # PyYAML's constructors crash on some tagged scalars (`!!float` with no value raises
        # IndexError, `!!int 1_` ValueError); turn those into a YAML error at the node's line.
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, IndexError, TypeError, OverflowError, KeyError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag} value {node.value!r:.40} ({type(exc).__name__})", node.start_mark
            ) from None


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list(_Loader.yaml_implicit_resolvers):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers[_first] if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _parse(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse once: the data and the node tree (for line numbers and duplicate keys)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


class _LineMap:
    """Dotted field path -> line number, read from the YAML node tree."""

    def __init__(self, text: str | None = None, node: yaml.Node | None = None):
        self.lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int]] = []
        if node is None and text is not None:
            try:
                node = yaml.compose(text, Loader=_Loader)
            except (yaml.YAMLError, RecursionError):
                return
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                path = f"{prefix}.{key}" if prefix else key
                if key in seen:
                    self.duplicates.append((path, key_node.start_mark.line + 1))
                seen.add(key)
                self.lines[path] = key_node.start_mark.line + 1
                self._walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                self.lines[path] = item.start_mark.line + 1
                self._walk(item, path)

    def line(self, field: str) -> int | None:
        while field:
            if field in self.lines:
                return self.lines[field]
            field = field.rpartition(".")[0]
        return None


def _model_at(path: tuple, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    model: Any = root
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = fields[part].annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: dict, hints: bool = True) -> str:
    """A pydantic error as one line; ``hints`` adds the did-you-mean (difflib: skipped for problems
    past the shown ones, so a million unknown keys cost a million dict lookups, not fuzzy matches)."""
    kind, msg = err["type"], err["msg"]
    loc = err["loc"]
    if kind == "extra_forbidden" and not hints:
        return f"unknown key '{loc[-1]}'"
    if kind == "extra_forbidden":
        parent = _model_at(tuple(str(p) for p in loc[:-1]))
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
        text = f"unknown key '{loc[-1]}'"
        if close:
            text += f" (did you mean '{close[0]}'?)"
        elif names:
            text += f"; allowed: {', '.join(names)}"
        return text
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    if kind not in ("model_type", "dict_type") and not isinstance(value, (dict, BaseModel)):
        got = repr(value)
        msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
    return msg


def _problems_from(exc: ValidationError, source: str, lines: _LineMap | None, override_fields=()) -> list[Problem]:
    problems = []

    def add(field: str, message: str) -> None:
        src = "--set" if any(field == f or field.startswith(f + ".") for f in override_fields) else source
        line = lines.line(field) if lines and src == source else None
        problems.append(Problem(src, field, line, message))

    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblems):
            # a cross-field check: one problem per field it names, at that field's line
            for sub, message in cause.items:
                add(f"{field}.{sub}" if field else sub, message)
        else:
            add(field, _describe(err, hints=len(problems) < MAX_SHOWN_PROBLEMS))
    return problems


class _SetLoader(_Loader):
    """`--set` values: YAML 1.2 core scalars, what a value typed on a command line means.

    PyYAML follows YAML 1.1, where `010` is octal 8, `1:30` is sexagesimal 90, `2024-01-01` a date
    and `no`/`on` booleans. Here ints are decimal (`010` is 10; `0o17`, `0x1f` and `1_000` also
    read as ints), booleans are only true/false (any case as YAML 1.2 allows: true, True, TRUE), and
    everything else that is not a number or null stays text.
    """


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if digits[:2] in ("0x", "0o"):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits, 10)  # decimal: leading zeros do not make it octal


_SetLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_SetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_SetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_SetLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _set_value(raw: str) -> Any:
    """One `--set` value as YAML 1.2; text that is not valid YAML (`[1, 2`) stays text."""
    if not raw.strip():
        return ""
    try:
        loader = _SetLoader(raw)  # (the reader refuses control characters here already)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError):
        return raw


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """['pretrain.max_lr=1e-3', ...] -> {'pretrain.max_lr': 0.001, ...} (values parsed as YAML 1.2)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{item}'", "example: --set pretrain.max_lr=1e-3")
        out[key] = _set_value(raw)
    return out


def _apply_overrides(data: dict, overrides: dict[str, Any], source: str) -> None:
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                here = ".".join(parts[: i + 1])
                parent = _model_at(tuple(parts[:i]))
                names = list(parent.model_fields) if parent else []
                close = difflib.get_close_matches(part, names, n=1)
                raise RecipeError(
                    [Problem("--set", key, None, f"'{here}' is not a section of the recipe"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))]
                )
            node = node[part]
        node[parts[-1]] = value
    del source


def recipe_from_dict(
    data: Any,
    *,
    source: str = "<dict>",
    overrides: dict[str, Any] | None = None,
    text: str | None = None,
    lines: _LineMap | None = None,
) -> Recipe:
    """Validate a plain mapping (with optional overrides) into a Recipe, or raise RecipeError.

    ``text`` (the YAML it came from) or an already built ``lines`` map adds line numbers.
    """
    if lines is None and text is not None:
        lines = _LineMap(text)
    problems: list[Problem] = []
    if lines is not None:
        problems += [Problem(source, f, ln, "duplicate key (the later value would win)") for f, ln in lines.duplicates]
    if data is None:
        raise RecipeError([Problem(source, "", 1 if lines is not None else None, "the recipe is empty")])
    if not isinstance(data, dict):
        what = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
        raise RecipeError(
            [
                Problem(
                    source,
                    "",
                    1 if lines is not None else None,
                    "a recipe is a mapping of sections (id, model, pretrain, instruct, provenance), "
                    f"got {what.get(type(data), type(data).__name__)}",
                )
            ]
        )
    original, data = data, _deepcopy(data)
    if overrides:
        _apply_overrides(data, overrides, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        found = _problems_from(exc, source, lines, tuple(overrides or ()))
        problems += _blame_overrides(found, original, source, overrides) if overrides else found
        recipe = None
    if problems:
        raise RecipeError(problems)
    assert recipe is not None
    return recipe


def _blame_overrides(found: list[Problem], original: dict, source: str, overrides: dict[str, Any]) -> list[Problem]:
    """Give the `--set` the problems only it causes, e.g. a cross-field check failing at a field of the file.

    A problem at a field the file alone has no problem with is reported as ``--set`` (with the
    overrides of that section), not as the file's line: the file is fine, the override is not.
    """
    if not any(p.source == source for p in found):
        return found
    try:
        Recipe.model_validate(original)
        before: set[str] = set()
    except ValidationError as exc:
        before = {p.field for p in _problems_from(exc, source, None)}
    out = []
    for p in found:
        if p.source == source and p.field not in before:
            section = [k for k in overrides if k.split(".")[0] == p.field.split(".")[0]] or list(overrides)
            keys = [k for k in section if k.rsplit(".", 1)[-1] in p.message] or section  # the ones it names
            p = Problem("--set", p.field, None, f"{p.message} (after --set {', '.join(keys)})")
        out.append(p)
    return out


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _read(path: Path) -> tuple[Any, _LineMap]:
    # The size limit is also the parse-time limit: PyYAML reads 60-150 KB/s (about 2 s at most).
    try:
        text = read_text_bounded(path, MAX_RECIPE_BYTES, "recipe")
    except UnreadableFile as exc:
        raise RecipeError([Problem(str(path), "", None, exc.reason)], exc.hint) from None
    try:
        data, node = _parse(text)
        return data, _LineMap(node=node)
    except RecursionError:
        raise RecipeError([Problem(str(path), "", None, "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([Problem(str(path), "", line, f"not valid YAML: {what}")]) from None


def load_recipe(spec: str | os.PathLike | Recipe, overrides: dict[str, Any] | Iterable[str] | None = None) -> Recipe:
    """Load a recipe by id or path, apply `--set` overrides, validate everything at once."""
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    if isinstance(spec, Recipe):
        if not overrides:
            return spec
        return recipe_from_dict(spec.model_dump(mode="json"), source=f"recipe {spec.id}", overrides=overrides)
    path = resolve_recipe_path(spec)
    data, lines = _read(path)
    return recipe_from_dict(data, source=str(path), overrides=overrides or None, lines=lines)


def validate_files(paths: Iterable[str]) -> tuple[list[Recipe], list[Problem]]:
    """Validate several files; returns the good recipes and every problem found."""
    recipes, problems = [], []
    for p in paths:
        try:
            recipes.append(load_recipe(p))
        except RecipeError as exc:
            problems += exc.problems
        except UsageError as exc:
            problems.append(Problem(str(p), "", None, exc.message))
    return recipes, problems
