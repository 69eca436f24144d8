"""Who may do what (``AUTH_MODE=token``): grants, the policy file, scopes, granted access.

Pure: no file or network I/O. The caller reads ``AUTH_POLICY_FILE`` and passes its text to
:func:`parse_policy`.

The policy file (YAML)::

    users:
      ci:                      # a user name, as in AUTH_USERS or `acme-registry user add`
        push: ["team/*"]       # push implies pull on the same patterns
        delete: "team/tmp/*"   # one pattern or a list
      nodes:
        pull: "*"
      ops:
        catalog: true          # GET /v2/_catalog
    anonymous:                 # requests without credentials
      pull: ["public/*"]

A pattern is a repository name in which ``*`` matches any characters, ``/`` included:
``team/*`` matches ``team/app`` and ``team/a/b``, ``*`` matches every repository. Patterns
use the characters of repository names (``a-z 0-9 . _ - /``) plus ``*``; anything else (a
capital letter, ``?``, ``[``, a space) is refused, so a pattern never means more than it
says.

How grants combine (:func:`effective_access`): a user's grants are those of the file and
those set at run time (``acme-registry user add NAME --push ...``) together. A user with no
grant anywhere may do everything (pull, push, delete everywhere, and the catalog), as with
htpasswd; a user with any grant has exactly its grants. The anonymous user has nothing
unless the file's ``anonymous`` section or ``AUTH_ANONYMOUS_PULL`` grants it something.

Scopes are the token request's ``scope`` values (distribution's "Token Scope
Documentation"): ``repository:NAME:ACTION[,ACTION]`` and ``registry:catalog:*``. The
access granted for a scope is the intersection of what was asked and what is allowed;
``*`` asked on a repository means every action allowed there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .names import is_user_name

PULL = "pull"
PUSH = "push"
DELETE = "delete"
ACTIONS = (PULL, PUSH, DELETE)
CATALOG = "catalog"
ALL = "*"

MAX_PATTERN_LENGTH = 255  # the registry's limit for a repository name
MAX_SCOPES = 32  # a pull asks for one or two; more is not a client we know
MAX_SCOPE_LENGTH = 512

# The user names auth accepts (auth._NAME): the file may name users not created yet.
_PATTERN = re.compile(r"[a-z0-9._/*-]+")
# distribution's reference grammar: path components, optionally led by a host[:port].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)"
)
_REPOSITORY = re.compile(rf"{_DOMAIN}?{_COMPONENT}(?:/{_COMPONENT})*")
_RESOURCE_TYPE = re.compile(r"[a-z0-9]+(?:\([a-z0-9]+\))?")
_ACTION = re.compile(r"[a-z]+|\*")
_BOOL_TAG = "tag:yaml.org,2002:bool"
# A repository may be called 2024: YAML reads that unquoted as an integer.
_PATTERN_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int")
MAX_POLICY_BYTES = 1 << 20


class PolicyError(ValueError):
    """The policy (file or a setting) is wrong; ``str()`` is one line naming where."""


class ScopeError(ValueError):
    """A requested scope is malformed: the token endpoint answers 400."""


# -- patterns ----------------------------------------------------------------------------


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid repository pattern, or None."""
    if not pattern:
        return "an empty pattern"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"a pattern longer than {MAX_PATTERN_LENGTH} characters"
    if _PATTERN.fullmatch(pattern) is None:
        bad = next(c for c in pattern if _PATTERN.fullmatch(c) is None)
        return (
            f"pattern {pattern[:80]!r} has {bad!r}: use a-z 0-9 . _ - / and * "
            "(repository names are lower case)"
        )
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        return f"pattern {pattern[:80]!r} has an empty path component"
    return None


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (``*``: any characters, ``/`` included).

    Greedy matching with one backtrack point (the last ``*``): at most
    len(pattern) * len(name) steps, so no pattern can make a check slow, which a regular
    expression with many ``.*`` could.
    """
    p = n = 0
    star = -1
    resume = 0
    while n < len(name):
        if p < len(pattern) and pattern[p] != ALL and pattern[p] == name[n]:
            p += 1
            n += 1
        elif p < len(pattern) and pattern[p] == ALL:
            star = p
            resume = n
            p += 1
        elif star >= 0:
            p = star + 1
            resume += 1
            n = resume
        else:
            return False
    while p < len(pattern) and pattern[p] == ALL:
        p += 1
    return p == len(pattern)


# -- grants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grants:
    """What one user is granted: patterns per action, and the catalog.

    ``push`` implies ``pull``: :meth:`actions_on` treats a push pattern as a pull pattern.
    """

    pull: tuple[str, ...] = ()
    push: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    catalog: bool = False

    @property
    def empty(self) -> bool:
        return not (self.pull or self.push or self.delete or self.catalog)

    def patterns(self, action: str) -> tuple[str, ...]:
        if action == PULL:
            return self.pull + self.push
        if action == PUSH:
            return self.push
        if action == DELETE:
            return self.delete
        return ()

    def actions_on(self, repository: str) -> frozenset[str]:
        """The actions granted on ``repository``."""
        return frozenset(
            action
            for action in ACTIONS
            if any(pattern_matches(p, repository) for p in self.patterns(action))
        )

    def union(self, other: Grants) -> Grants:
        return Grants(
            pull=_unique(self.pull + other.pull),
            push=_unique(self.push + other.push),
            delete=_unique(self.delete + other.delete),
            catalog=self.catalog or other.catalog,
        )

    def describe(self) -> str:
        """One line for ``acme-registry user list``: ``push team/*; pull *; catalog``."""
        parts = [f"{a} {' '.join(getattr(self, a))}" for a in ACTIONS if getattr(self, a)]
        if self.catalog:
            parts.append(CATALOG)
        return "; ".join(parts) if parts else "everything"


EVERYTHING = Grants(pull=(ALL,), push=(ALL,), delete=(ALL,), catalog=True)
NOTHING = Grants()


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def make_grants(
    *,
    pull: Sequence[str] = (),
    push: Sequence[str] = (),
    delete: Sequence[str] = (),
    catalog: bool = False,
    source: str = "grant",
) -> Grants:
    """Grants from patterns (e.g. the CLI's ``--push`` flags); PolicyError names ``source``."""
    for action, patterns in ((PULL, pull), (PUSH, push), (DELETE, delete)):
        for pattern in patterns:
            problem = pattern_problem(pattern)
            if problem:
                raise PolicyError(f"{source}: {action}: {problem}")
    return Grants(_unique(pull), _unique(push), _unique(delete), catalog)


def parse_anonymous_pull(value: str, variable: str = "AUTH_ANONYMOUS_PULL") -> tuple[str, ...]:
    """``PATTERN[,PATTERN]`` -> patterns; PolicyError names ``variable``."""
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    if not patterns:
        raise PolicyError(f"{variable}: no pattern (PATTERN[,PATTERN], e.g. public/*)")
    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem:
            raise PolicyError(f"{variable}: {problem}")
    return _unique(patterns)


# -- the policy file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The parsed policy file: grants per user name and the anonymous user's."""

    users: Mapping[str, Grants] = field(default_factory=dict)
    anonymous: Grants = NOTHING


EMPTY_POLICY = Policy()


def parse_policy(text: str, source: str = "AUTH_POLICY_FILE") -> Policy:
    """Parse the policy file's text; PolicyError says ``source:line: problem``.

    Strict: unknown keys, duplicate keys, wrong types, empty entries and invalid patterns
    are errors, since a policy that silently means less (or more) than it says is worse
    than one that does not load.
    """
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise PolicyError(f"{source}{line}: {problem}") from None
    if root is None:
        return EMPTY_POLICY
    reader = _Reader(source)
    top = reader.mapping(root, "the file", ("users", "anonymous"))
    users: dict[str, Grants] = {}
    if "users" in top:
        _, value = top["users"]
        for name, (name_node, entry) in reader.mapping(value, "users", None).items():
            if not is_user_name(name):
                reader.fail(name_node, f"users: {name[:80]!r} is not a user name")
            users[name] = reader.grants(entry, f"users.{name}")
    anonymous = NOTHING
    if "anonymous" in top:
        anonymous = reader.grants(top["anonymous"][1], "anonymous")
    return Policy(users=users, anonymous=anonymous)


class _Reader:
    """Walks the composed YAML nodes, so every error can name its line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node, problem: str) -> None:
        raise PolicyError(f"{self.source}:{node.start_mark.line + 1}: {problem}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.fail(key, f"{what}: keys must be plain names")
            name = str(key.value)
            if allowed is not None and name not in allowed:
                self.fail(key, f"{what}: unknown key {name[:80]!r} (known: {', '.join(allowed)})")
            if name in found:
                self.fail(key, f"{what}: {name[:80]!r} appears twice")
            found[name] = (key, value)
        return found

    def grants(self, node: yaml.Node, what: str) -> Grants:
        entries = self.mapping(node, what, (*ACTIONS, CATALOG))
        if not entries:
            self.fail(node, f"{what}: no grant (remove the entry to grant everything)")
        values: dict[str, Any] = {}
        for key, (_, value) in entries.items():
            if key == CATALOG:
                values[key] = self.boolean(value, f"{what}.{key}")
            else:
                values[key] = self.patterns(value, f"{what}.{key}")
        if values.get(CATALOG) is False and len(values) == 1:
            self.fail(node, f"{what}: no grant (remove the entry to grant everything)")
        return Grants(
            pull=values.get(PULL, ()),
            push=values.get(PUSH, ()),
            delete=values.get(DELETE, ()),
            catalog=values.get(CATALOG, False),
        )

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag == _BOOL_TAG:
            return str(node.value).lower() in ("true", "yes", "on")
        self.fail(node, f"{what}: expected true or false")
        raise AssertionError  # unreachable: fail() raises

    def patterns(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not items:
            self.fail(node, f"{what}: an empty list (remove the key instead)")
        patterns = []
        for item in items:
            if not isinstance(item, yaml.ScalarNode) or item.tag not in _PATTERN_TAGS:
                self.fail(item, f"{what}: expected a pattern (a string, e.g. team/*)")
            problem = pattern_problem(str(item.value))
            if problem:
                self.fail(item, f"{what}: {problem}")
            patterns.append(str(item.value))
        return _unique(patterns)


# -- combining ---------------------------------------------------------------------------


def effective_grants(
    user: str | None,
    policy: Policy,
    runtime: Mapping[str, Grants],
    anonymous_pull: Sequence[str] = (),
) -> Grants:
    """What ``user`` (None: anonymous) may do, from the file, run-time grants and
    ``AUTH_ANONYMOUS_PULL``. Call it at every token request: changes apply at once."""
    if user is None:
        return policy.anonymous.union(Grants(pull=tuple(anonymous_pull)))
    combined = policy.users.get(user, NOTHING).union(runtime.get(user, NOTHING))
    return EVERYTHING if combined.empty else combined


# -- scopes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """One requested scope: ``type:name:actions``."""

    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scope(text: str) -> Scope:
    """``repository:team/app:pull,push`` -> Scope; ScopeError when malformed.

    The name may hold a ``host:port/`` prefix, so the type ends at the first colon and the
    actions start after the last. Well-formed scopes of other types parse (and are granted
    nothing); a repository name outside distribution's grammar is malformed.
    """
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeError(f"a scope longer than {MAX_SCOPE_LENGTH} characters")
    resource_type, sep1, rest = text.partition(":")
    name, sep2, actions_text = rest.rpartition(":")
    if not (sep1 and sep2 and resource_type and name):
        raise ScopeError(f"scope {text[:80]!r} is not type:name:actions")
    if _RESOURCE_TYPE.fullmatch(resource_type) is None:
        raise ScopeError(f"scope {text[:80]!r} has an invalid resource type")
    actions = actions_text.split(",")
    if not all(_ACTION.fullmatch(a) for a in actions):
        raise ScopeError(f"scope {text[:80]!r} has an invalid action list")
    if resource_type == "repository" and _REPOSITORY.fullmatch(name) is None:
        raise ScopeError(f"scope {text[:80]!r} names an invalid repository")
    return Scope(resource_type, name, tuple(dict.fromkeys(actions)))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every scope in ``values`` (each may hold several, space-separated, as OAuth2's
    ``scope`` does)."""
    scopes = [parse_scope(part) for value in values for part in value.split()]
    if len(scopes) > MAX_SCOPES:
        raise ScopeError(f"more than {MAX_SCOPES} scopes")
    return scopes


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}

    def scope(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def granted_access(grants: Grants, scopes: Sequence[Scope]) -> list[Access]:
    """The intersection of ``scopes`` and ``grants``, merged per resource, in asked order.

    A scope with nothing granted is left out (the registry then answers the request with
    401/``denied``); it is never an error, as the token specification says.
    """
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        allowed: set[str] = set()
        if scope.type == "repository":
            on_name = grants.actions_on(scope.name)
            wanted = set(ACTIONS) if ALL in scope.actions else set(scope.actions)
            allowed = set(on_name) & wanted
        elif (scope.type, scope.name) == ("registry", CATALOG) and grants.catalog:
            # The registry checks the catalog against the action "*" itself.
            allowed = {ALL} if ALL in scope.actions else set()
        if allowed:
            merged.setdefault((scope.type, scope.name), set()).update(allowed)
    order = {ALL: -1, **{a: i for i, a in enumerate(ACTIONS)}}
    return [
        Access(type_, name, tuple(sorted(actions, key=lambda a: order.get(a, 99))))
        for (type_, name), actions in merged.items()
    ]
