"""YAML files read strictly: a key given twice is an error (PyYAML keeps the last one), an alias
bomb is refused before anything walks it, and a bad file is one line naming it."""

from __future__ import annotations

from pathlib import Path

import yaml

from fusechat.errors import FusechatError

# More leaves than any configuration has: a file past it is an alias bomb (a few lines that
# expand to 10^8 values), refused before anything walks it.
MAX_YAML_LEAVES = 1_000_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one,
    so a second ``train:`` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _leaves(node: object, limit: int) -> int:
    """How many scalars ``node`` expands to, counting shared (aliased) parts each time they
    appear, stopping once past ``limit``."""
    stack, n = [node], 0
    while stack and n <= limit:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        else:
            n += 1
    return n


def parse_yaml(text: str, source: str, invalid: str | None = None) -> object:
    """YAML text read strictly: duplicate keys and alias bombs refused, one line naming
    ``source`` and the line (``invalid``: the message for any YAML error instead)."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        if invalid:
            raise FusechatError(f"{source}: {invalid}") from None
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        if isinstance(e, yaml.constructor.ConstructorError):
            raise FusechatError(f"{source}: {where}{problem}") from None
        raise FusechatError(f"{source}: YAML syntax error at {where}{problem}") from None
    if _leaves(raw, MAX_YAML_LEAVES) > MAX_YAML_LEAVES:
        raise FusechatError(f"{source}: expands to more than {MAX_YAML_LEAVES:,} values "
                            "(aliases repeated inside aliases?)")  # fmt: skip
    return raw


def read_yaml(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping; any problem raises a one-line ``FusechatError``
    naming ``what`` the file was meant to be."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FusechatError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FusechatError(f"{path}: cannot read {what} ({e})") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise FusechatError(f"{path}: a {what} must be a mapping, got {type(raw).__name__}")
    return raw
