"""Reading a YAML file a user gave (a space, a training config): safely, once.

Space and config files are shared between colleagues and downloaded with
papers, so they are untrusted input:

- the safe loader only (no Python objects);
- a key repeated within one mapping is an error naming both lines (PyYAML
  would silently keep the last);
- a file over :data:`MAX_YAML_BYTES`, or whose aliases (``*name``) expand to
  more than :data:`MAX_YAML_VALUES` values (a "billion laughs" file), is
  refused before anything is built;
- every error is one :class:`ConfigError` naming the file and, where known,
  the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stain_search.errors import ConfigError


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names the same key twice (PyYAML would keep the last)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark):
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=second)
        self.key, self.first, self.second = key, first, second


class UniqueKeySafeLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping with a repeated key.

    PyYAML silently keeps the last of two equal keys, so a space file that
    lists ``loss.lambda_cycle`` twice would search the second range only.
    Keys brought in by a merge (``<<: *base``) may still be overridden: that
    is what a merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# Space and config files are shared between colleagues and downloaded with
# papers: untrusted input. A hand-written one is a few KiB and a few hundred
# values; these bounds are far above that and far below what hurts a machine.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, every alias counted as expanded


def _expanded_size(root: yaml.Node, *, path: Path) -> int:
    """How many values the document holds once every alias (``*name``) is
    expanded, counted without expanding: each node is sized once (a "billion
    laughs" file is a few dozen nodes that expand to billions of values)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
            else list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            open_.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_VALUES + 1)
            continue
        if id(node) in open_:
            raise ConfigError(f"{path}: an alias (line {node.start_mark.line + 1}) refers to a "
                              f"value that contains it; write the value out instead")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader; errors name the file and line.

    A key repeated within one mapping is an error naming both lines. A file
    over :data:`MAX_YAML_BYTES`, or one whose aliases expand to more than
    :data:`MAX_YAML_VALUES` values, is refused before anything is built.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_YAML_BYTES:,}-byte "
                          f"limit for a space or config file; is it the right file?")
    try:
        loader = UniqueKeySafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, path=path) > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{path}: its aliases (*name) expand to over {MAX_YAML_VALUES:,} values, "
                    f"far more than a space or config holds; write the values out instead")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a space or config file") from None
    except DuplicateKeyError as err:
        a, b = err.first, err.second
        at = (f"lines {a.line + 1} and {b.line + 1}" if a.line != b.line else
              f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}")
        raise ConfigError(f"{path}: key `{err.key}` appears twice ({at}): keep one") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML)") from None
