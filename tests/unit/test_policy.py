"""The policy file, pattern matching, scope parsing and the granted intersection."""

from __future__ import annotations

import time

import pytest

from acme_registry import policy
from acme_registry.policy import (
    EVERYTHING,
    NOTHING,
    Access,
    Grants,
    PolicyError,
    ScopeError,
    effective_grants,
    granted_access,
    make_grants,
    parse_anonymous_pull,
    parse_policy,
    parse_scope,
    parse_scopes,
    pattern_matches,
    pattern_problem,
)

EXAMPLE = """\
users:
  ci:
    push: ["team/*"]
    delete: team/tmp/*
  nodes:
    pull: "*"
  ops:
    catalog: true
anonymous:
  pull: [public/*, "docs"]
"""


# -- patterns ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*", "a", True),
        ("*", "team/app/sub", True),
        ("team/*", "team/app", True),
        ("team/*", "team/a/b", True),
        ("team/*", "team", False),
        ("team/*", "teamx/app", False),
        ("team", "team", True),
        ("team", "team/app", False),
        ("*/app", "x/y/app", True),
        ("*/app", "app", False),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXbY", False),
        ("te.m", "team", False),  # "." is literal, not a regex wildcard
        ("**", "x/y", True),
    ],
)
def test_pattern_matching(pattern: str, name: str, expected: bool) -> None:
    assert pattern_matches(pattern, name) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "Team/*",
        "team/[ab]",
        "team/?",
        "a b",
        "(a|b)",
        "team/",
        "/team",
        "a//b",
        "x" * 256,
        "a\\b",
        "a$",
        "^a",
        "a+",
        "\u00e9",
    ],
)
def test_invalid_patterns_are_refused(pattern: str) -> None:
    assert pattern_problem(pattern) is not None
    with pytest.raises(PolicyError, match=r"^test: pull: "):
        make_grants(pull=[pattern], source="test")


def test_hostile_pattern_is_fast() -> None:
    # A regex with 60 ".*" would backtrack for ages on this; the matcher is quadratic at worst.
    pattern = "*a" * 60 + "b"
    name = "a" * 255
    started = time.perf_counter()
    assert not pattern_matches(pattern, name)
    assert time.perf_counter() - started < 1.0  # generous: typically well under 50 ms


# -- the file ----------------------------------------------------------------------------


def test_example_file() -> None:
    parsed = parse_policy(EXAMPLE, "policy.yml")
    assert parsed.users["ci"].push == ("team/*",)
    assert parsed.users["ci"].delete == ("team/tmp/*",)
    assert parsed.users["ci"].actions_on("team/app") == {"pull", "push"}  # push implies pull
    assert parsed.users["ci"].actions_on("team/tmp/x") == {"pull", "push", "delete"}
    assert parsed.users["ci"].actions_on("other") == frozenset()
    assert parsed.users["nodes"].actions_on("any/thing") == {"pull"}
    assert parsed.users["ops"].catalog
    assert parsed.anonymous.pull == ("public/*", "docs")


def test_empty_file_is_empty_policy() -> None:
    assert parse_policy("", "p") == policy.EMPTY_POLICY
    assert parse_policy("# nothing\n", "p") == policy.EMPTY_POLICY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users: [a]\n", r"^p:1: users: expected a mapping$"),
        ("user:\n  ci: {pull: x}\n", r"^p:1: the file: unknown key 'user'"),
        ("users:\n  ci:\n    pul: x\n", r"^p:3: users.ci: unknown key 'pul'"),
        ("users:\n  ci:\n    pull: Team/*\n", r"^p:3: users.ci.pull: pattern 'Team/\*' has 'T'"),
        ("users:\n  ci:\n    pull: []\n", r"^p:3: users.ci.pull: an empty list"),
        ("users:\n  ci: {}\n", r"^p:2: users.ci: no grant"),
        ("users:\n  ci:\n    catalog: false\n", r"^p:3: users.ci: no grant"),
        ("users:\n  ci:\n    catalog: 'yes'\n", r"^p:3: users.ci.catalog: expected true or false"),
        ("users:\n  ci:\n    pull: [x, [y]]\n", r"^p:3: users.ci.pull: expected a pattern"),
        ("users:\n  ci:\n    pull: x\n  ci:\n    pull: y\n", r"^p:4: users: 'ci' appears twice"),
        ("users:\n  'bad name':\n    pull: x\n", r"^p:2: users: 'bad name' is not a user name"),
        ("users:\n  ci:\n    pull: *\n", r"^p:3: "),  # an unquoted * is a YAML alias
        ("users: {ci: {pull: x}\n", r"^p:2: "),
        ("anonymous:\n  push: [x]\n  pull: [y]\n  delete: null\n", r"^p:4: anonymous.delete"),
    ],
)
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy(text, "p")
    assert "\n" not in str(info.value)


def test_huge_file_is_refused() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy("#" * (policy.MAX_POLICY_BYTES + 1), "p")


def test_numeric_repository_names_are_patterns() -> None:
    assert parse_policy("anonymous:\n  pull: 2024\n", "p").anonymous.pull == ("2024",)


# -- combining ---------------------------------------------------------------------------


def test_user_without_grants_has_everything() -> None:
    parsed = parse_policy(EXAMPLE, "p")
    assert effective_grants("someone", parsed, {}) == EVERYTHING
    assert effective_grants("someone", policy.EMPTY_POLICY, {}) == EVERYTHING


def test_user_with_grants_has_exactly_those_from_file_and_runtime() -> None:
    parsed = parse_policy(EXAMPLE, "p")
    runtime = {"ci": make_grants(pull=["base/*"]), "new": make_grants(delete=["x"])}
    ci = effective_grants("ci", parsed, runtime)
    assert ci.actions_on("base/img") == {"pull"}
    assert ci.actions_on("team/app") == {"pull", "push"}
    assert ci.actions_on("elsewhere") == frozenset()
    assert not ci.catalog
    new = effective_grants("new", parsed, runtime)
    assert new.actions_on("x") == {"delete"}
    assert new.actions_on("y") == frozenset()


def test_anonymous_has_nothing_unless_granted() -> None:
    assert effective_grants(None, policy.EMPTY_POLICY, {}) == NOTHING
    anonymous = effective_grants(None, policy.EMPTY_POLICY, {}, ("public/*",))
    assert anonymous.actions_on("public/x") == {"pull"}
    assert anonymous.actions_on("private/x") == frozenset()
    both = effective_grants(None, parse_policy(EXAMPLE, "p"), {}, ("open",))
    assert both.actions_on("docs") == {"pull"} and both.actions_on("open") == {"pull"}
    # A user named like a grant source never picks up the anonymous grants.
    assert effective_grants("anonymous", parse_policy(EXAMPLE, "p"), {}) == EVERYTHING


def test_anonymous_pull_setting() -> None:
    assert parse_anonymous_pull("public/*, docs ,public/*") == ("public/*", "docs")
    with pytest.raises(PolicyError, match=r"^AUTH_ANONYMOUS_PULL: pattern 'A' has 'A'"):
        parse_anonymous_pull("A")
    with pytest.raises(PolicyError, match=r"^AUTH_ANONYMOUS_PULL: no pattern"):
        parse_anonymous_pull(" , ")


def test_describe() -> None:
    assert make_grants(push=["a/*"], catalog=True).describe() == "push a/*; catalog"
    assert NOTHING.describe() == "everything"


# -- scopes ------------------------------------------------------------------------------


def test_parse_scopes() -> None:
    assert parse_scope("repository:team/app:pull,push") == policy.Scope(
        "repository", "team/app", ("pull", "push")
    )
    assert parse_scope("registry:catalog:*") == policy.Scope("registry", "catalog", ("*",))
    # A host:port prefix keeps its colon in the name.
    assert parse_scope("repository:host:5000/app:pull").name == "host:5000/app"
    assert parse_scope("repository(plugin):x:pull").type == "repository(plugin)"
    assert [str(s) for s in parse_scopes(["repository:a:pull repository:b:push", "x:y:z"])] == [
        "repository:a:pull",
        "repository:b:push",
        "x:y:z",
    ]


@pytest.mark.parametrize(
    "scope",
    [
        "repository",
        "repository:app",
        "repository::pull",
        ":app:pull",
        "repository:app:",
        "repository:app:pull,",
        "repository:app:PULL",
        "repository:App:pull",
        "repository:app/:pull",
        "repository:a..b:pull",
        "Repository:app:pull",
        "repository:app:pull;rm",
        "repository:" + "a" * 600 + ":pull",
    ],
)
def test_malformed_scopes(scope: str) -> None:
    with pytest.raises(ScopeError):
        parse_scopes([scope])


def test_too_many_scopes() -> None:
    with pytest.raises(ScopeError, match="more than"):
        parse_scopes([" ".join(f"repository:r{i}:pull" for i in range(policy.MAX_SCOPES + 1))])


def test_granted_is_the_intersection() -> None:
    grants = make_grants(pull=["*"], push=["team/*"], delete=["team/tmp/*"])
    scopes = parse_scopes(
        [
            "repository:team/app:pull,push",
            "repository:other:pull,push,delete",
            "repository:team/tmp/x:*",
            "registry:catalog:*",
            "unknown:thing:pull",
        ]
    )
    assert granted_access(grants, scopes) == [
        Access("repository", "team/app", ("pull", "push")),
        Access("repository", "other", ("pull",)),
        Access("repository", "team/tmp/x", ("pull", "push", "delete")),
    ]


def test_nothing_granted_leaves_the_scope_out() -> None:
    assert granted_access(NOTHING, parse_scopes(["repository:a:pull"])) == []
    assert granted_access(make_grants(pull=["a"]), parse_scopes(["repository:a:push"])) == []


def test_catalog_and_merging() -> None:
    assert granted_access(EVERYTHING, parse_scopes(["registry:catalog:*"])) == [
        Access("registry", "catalog", ("*",))
    ]
    assert granted_access(Grants(catalog=True), parse_scopes(["registry:catalog:pull"])) == []
    merged = granted_access(EVERYTHING, parse_scopes(["repository:a:push", "repository:a:pull"]))
    assert merged == [Access("repository", "a", ("pull", "push"))]
    assert merged[0].scope() == "repository:a:pull,push"
    assert merged[0].claim() == {"type": "repository", "name": "a", "actions": ["pull", "push"]}
