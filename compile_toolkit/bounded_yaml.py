"""YAML files read as data, within limits: ``yaml.SafeLoader`` (never code) that also refuses alias
bombs, deep nesting, duplicate keys and scalars that do not fit their type, each in one line naming
the file. Recipes are read through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import CtkError, clip, shown

MAX_NODES = 10_000
MAX_DEPTH = 50


def load_yaml_file(path: str | Path, what: str) -> Any:
    """The data of the YAML file ``path`` (safe YAML: data, never code; bounded, see
    :class:`_BoundedLoader`); every problem is one :class:`CtkError` line starting ``{what} {path}:``."""
    path = Path(path)
    try:
        data = _parse(path.read_text(encoding="utf-8"), f"{what} {path}")
    except OSError as error:
        raise CtkError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise CtkError(f"{what} {path}: not UTF-8 text (byte 0x{byte:02x} at offset {error.start})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise CtkError(f"{what} {path}: not valid YAML{line}") from None
    return data


def _parse(text: str, source: str) -> Any:
    """The one YAML document in ``text`` (what ``yaml.safe_load`` returns, within the limits)."""
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with limits no configuration file (a recipe: a few dozen nodes, three
    levels deep) comes near, each refused in one line that names the file:

    * at most :data:`MAX_NODES` nodes with every alias expanded: aliases share one Python object,
      but anything that walks the data (a repr in an error message, a copy) expands them, and a
      400-byte alias bomb expands to billions of nodes;
    * at most :data:`MAX_DEPTH` levels of nesting: PyYAML composes by recursion, and 3,000 ``[``
      raised RecursionError;
    * no key twice in one mapping: YAML keeps the last silently, so a recipe with ``schedule:``
      twice pruned as its second one said;
    * no scalar that matches a type it does not fit (``2001-13-45``, an integer of 5,000 digits,
      ``!!int ''``): PyYAML raises ValueError, IndexError or KeyError for them.
    """

    def __init__(self, text: str, source: str) -> None:
        """``source`` starts every error line (``recipe path.yaml``)."""
        super().__init__(text)
        self.source = source
        self.nodes = 0  # nodes composed so far, each alias counted as the nodes under its anchor
        self.depth = 0
        self.anchor_nodes: dict[str, int] = {}  # anchor -> nodes under it, aliases expanded

    def refuse(self, message: str) -> CtkError:
        return CtkError(f"{self.source}: {message}")

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        """Count the node (an alias: the nodes under its anchor) and its depth before composing it."""
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            self._count(self._alias_nodes(event.anchor, line), line)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.refuse(f"nested more than {MAX_DEPTH} levels deep at line {line}")
        start = self.nodes
        self._count(1, line)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if event.anchor is not None:
            self.anchor_nodes[event.anchor] = self.nodes - start
        return node

    def _alias_nodes(self, anchor: str, line: int) -> int:
        """The nodes an alias stands for; an alias inside its own anchor stands for endless ones."""
        if anchor in self.anchor_nodes:
            return self.anchor_nodes[anchor]
        if anchor in self.anchors:
            raise self.refuse(f"alias *{clip(anchor)} at line {line} is inside its own anchor (an endless structure)")
        return 0  # an undefined alias: the composer refuses it

    def _count(self, nodes: int, line: int) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise self.refuse(
                f"more than {MAX_NODES} YAML nodes with aliases expanded (at line {line}); a configuration has a few dozen"
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Refuse a key given twice (merged ``<<`` keys may be overridden, as YAML intends)."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise self.refuse(f"key {shown(key)} is given twice (lines {lines[key]} and {line}); "
                                  "give it once (YAML would keep the last one only)")
            lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A scalar that does not fit its type is one line naming it, not PyYAML's exception."""
        try:
            return super().construct_object(node, deep)
        except (LookupError, ValueError, AttributeError) as error:
            if not isinstance(node, yaml.ScalarNode):
                raise
            kind = node.tag.rsplit(":", 1)[-1]
            reason = f" ({clip(str(error))})" if isinstance(error, ValueError) else ""
            raise self.refuse(
                f"{shown(node.value)} at line {node.start_mark.line + 1} is not a valid {kind}{reason}"
            ) from None
