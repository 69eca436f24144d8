"""Users: parsing AUTH_USERS / AUTH_USERS_FILE, bcrypt hashing, the store and its htpasswd."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from acme_registry import auth
from acme_registry.auth import (
    AuthError,
    Credential,
    UsersFormatError,
    UserStore,
    load_env_users,
)
from acme_registry.statekeys import HTPASSWD_FILE, USERS, USERS_COPY_FILE
from acme_registry.storage import FileStorage, StoreUnavailable, Versioned
from tests.support.users import auth_dir, user_store

COST = 4  # the lowest bcrypt cost: these tests hash a lot
SECRET = "Sup3r-s3cret-value"


def hashed(password: str, prefix: str = "$2b$") -> str:
    value = bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()
    return prefix + value[4:]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- parsing ---------------------------------------------------------------------------------


def test_auth_users_comma_separated():
    users = load_env_users(f"alice:{SECRET}, bob:pa ss:word ,carol.x_1-2:x", None)
    assert list(users) == ["alice", "bob", "carol.x_1-2"]
    assert users["alice"] == Credential(SECRET, hashed=False, source="AUTH_USERS")
    # Only the first colon separates; inner spaces and colons belong to the password.
    assert users["bob"].secret == "pa ss:word"


def test_auth_users_newline_separated_allows_commas_in_passwords():
    users = load_env_users("alice:a,b,c\n\nbob:x\n", None)
    assert {n: c.secret for n, c in users.items()} == {"alice": "a,b,c", "bob": "x"}


def test_users_file_plain_and_bcrypt_lines():
    h2y, h2a, h2b = hashed("one", "$2y$"), hashed("two", "$2a$"), hashed("three")
    text = f"# team\n\nalice:{h2y}\n  bob:{h2a}  \ncarol:{h2b}\n# dave:old\nerin:plain pw\n"
    users = load_env_users(None, text)
    assert list(users) == ["alice", "bob", "carol", "erin"]
    assert users["alice"] == Credential(h2y, hashed=True, source="AUTH_USERS_FILE")
    assert users["bob"].secret == h2a and users["bob"].hashed
    assert users["carol"].hashed
    assert users["erin"] == Credential("plain pw", hashed=False, source="AUTH_USERS_FILE")


def test_credential_repr_hides_the_secret():
    assert SECRET not in repr(Credential(SECRET, hashed=False))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"alice:x\n{SECRET}\n", "line 2: expected name:password"),
        (f"al ice:{SECRET}\n", "line 1: the user name is not"),
        (f":{SECRET}\n", "line 1: the user name is not"),
        (f"{'a' * 65}:{SECRET}\n", "line 1: the user name is not"),
        (f"alice:{SECRET}\n#\nalice:{SECRET}2\n", "line 3: user 'alice' is already on line 1"),
        ("alice:\n", "line 1: user 'alice': the password is empty"),
        (f"alice:{SECRET * 5}\n", "longer than 72 bytes"),
        (f"alice:$2y$10${SECRET}\n", "line 1: user 'alice' has a malformed bcrypt hash"),
        (f"alice:$apr1${SECRET}\n", "accepts bcrypt only"),
        (f"alice:{{SHA}}{SECRET}=\n", "accepts bcrypt only"),
        (f"alice:$6$salt${SECRET}\n", "accepts bcrypt only"),
    ],
)
def test_users_file_errors_name_the_line_and_never_the_password(text, expected):
    with pytest.raises(UsersFormatError) as caught:
        load_env_users(None, text)
    error = caught.value
    assert expected in str(error)
    assert error.source == "AUTH_USERS_FILE"
    assert str(error) == f"AUTH_USERS_FILE: {error.problem}"
    for shown in (str(error), repr(error), repr(error.args)):
        assert SECRET not in shown


def test_auth_users_errors_name_the_entry():
    with pytest.raises(UsersFormatError) as caught:
        load_env_users(f"alice:x,{SECRET}", None)
    assert str(caught.value) == "AUTH_USERS: entry 2: expected name:password"


def test_a_bcrypt_hash_in_auth_users_is_kept():
    value = hashed("pw")
    assert load_env_users(f"ci:{value}", None)["ci"] == Credential(value, True, "AUTH_USERS")


def test_load_env_users_merges_both_sources():
    users = load_env_users("alice:a", "bob:b\n")
    assert {n: c.source for n, c in users.items()} == {
        "alice": "AUTH_USERS",
        "bob": "AUTH_USERS_FILE",
    }
    assert load_env_users(None, None) == {}
    assert load_env_users("", "# nobody\n") == {}


def test_load_env_users_rejects_a_name_in_both_sources():
    with pytest.raises(UsersFormatError) as caught:
        load_env_users(f"alice:{SECRET}", f"\nalice:{SECRET}\n")
    assert str(caught.value) == (
        "AUTH_USERS_FILE: line 2: user 'alice' is already defined in AUTH_USERS"
    )


# -- hashing ---------------------------------------------------------------------------------


def test_hash_round_trip_with_bcrypt_checkpw():
    value = auth.hash_password(SECRET, cost=COST)
    assert auth.is_bcrypt_hash(value)
    assert auth.hash_cost(value) == COST
    assert bcrypt.checkpw(SECRET.encode(), value.encode())
    assert not bcrypt.checkpw(b"wrong", value.encode())
    assert auth.check_password(SECRET, value)
    assert not auth.check_password(SECRET, "not a hash")


def test_default_cost_is_ten():
    assert auth.hash_cost(auth.hash_password("pw")) == 10 == auth.DEFAULT_COST


@pytest.mark.parametrize("password", ["", "x" * 73, "a\nb", "a\0b"])
def test_hash_password_refuses_unusable_passwords(password):
    with pytest.raises(AuthError):
        auth.hash_password(password, cost=COST)


@pytest.mark.parametrize("cost", [3, 32])
def test_cost_out_of_range(cost, tmp_path):
    with pytest.raises(AuthError):
        auth.hash_password("pw", cost=cost)
    with pytest.raises(AuthError):
        user_store(tmp_path, cost=cost)


def test_generated_passwords_are_long_and_distinct():
    passwords = {auth.generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) == 32 and auth.password_problem(p) is None for p in passwords)


def test_read_password():
    assert auth.read_password(io.StringIO("s3cret pw\r\nignored\n")) == "s3cret pw"
    assert auth.read_password(io.StringIO("")) is None
    assert auth.read_password(io.StringIO("\n")) is None


def test_registry_auth_config(tmp_path):
    path = tmp_path / "auth" / "htpasswd"
    assert auth.registry_auth_config(path, "acme-registry") == {
        "htpasswd": {"realm": "acme-registry", "path": str(path)}
    }


# -- the store -------------------------------------------------------------------------------


def store(tmp_path: Path, env: str | None = None, file_text: str | None = None) -> UserStore:
    return user_store(tmp_path / "data", load_env_users(env, file_text), cost=COST)


def htpasswd(s: UserStore) -> dict[str, str]:
    return auth.parse_htpasswd(s.htpasswd_path.read_text())


def test_add_list_remove_and_file_modes(tmp_path):
    s = store(tmp_path)
    assert s.add("bob", SECRET) is True
    assert s.add("bob", "other") is False  # a new password for an existing user
    assert s.add("carol", "c") is True
    assert s.list() == {"bob": "run-time", "carol": "run-time"}
    entries = htpasswd(s)
    assert set(entries) == {"bob", "carol"}
    assert bcrypt.checkpw(b"other", entries["bob"].encode())

    s.remove("bob")
    assert s.list() == {"carol": "run-time"}
    assert set(htpasswd(s)) == {"carol"}
    with pytest.raises(AuthError, match="no user 'bob'"):
        s.remove("bob")

    assert mode(auth_dir(tmp_path / "data")) == 0o700
    for path in (s.htpasswd_path, (auth_dir(tmp_path / "data") / "users.json")):
        assert mode(path) == 0o600
    stored = json.loads((auth_dir(tmp_path / "data") / "users.json").read_text())
    assert set(stored["users"]) == {"carol"}
    assert (
        SECRET
        not in (auth_dir(tmp_path / "data") / "users.json").read_text()
        + s.htpasswd_path.read_text()
    )


def test_add_rejects_bad_names_and_passwords_without_echoing(tmp_path):
    s = store(tmp_path)
    with pytest.raises(AuthError, match="user name"):
        s.add("bad name", SECRET)
    with pytest.raises(AuthError) as caught:
        s.add("bob", SECRET * 5)
    assert SECRET not in str(caught.value)
    assert not (auth_dir(tmp_path / "data") / "users.json").exists()


def test_environment_users_are_always_there_and_cannot_be_changed(tmp_path):
    s = store(tmp_path, env=f"alice:{SECRET}", file_text=f"ci:{hashed('ci-pw')}\n")
    assert s.sync_htpasswd() is True
    s.add("bob", "b")
    assert s.list() == {"alice": "AUTH_USERS", "bob": "run-time", "ci": "AUTH_USERS_FILE"}
    with pytest.raises(AuthError, match=r"defined by AUTH_USERS, .*remove it there") as caught:
        s.remove("alice")
    assert SECRET not in str(caught.value)
    with pytest.raises(AuthError, match="defined by AUTH_USERS_FILE"):
        s.add("ci", "new")
    entries = htpasswd(s)
    assert bcrypt.checkpw(SECRET.encode(), entries["alice"].encode())
    assert bcrypt.checkpw(b"ci-pw", entries["ci"].encode())
    assert entries["ci"] == s.env_users["ci"].secret  # a given hash is kept as it is


def test_a_run_time_user_is_shadowed_by_an_environment_user(tmp_path):
    store(tmp_path).add("alice", "run-time-pw")
    s = store(tmp_path, env="alice:env-pw")
    s.sync_htpasswd()
    assert s.list() == {"alice": "AUTH_USERS"}
    assert bcrypt.checkpw(b"env-pw", htpasswd(s)["alice"].encode())


def test_sync_writes_only_when_the_content_changes(tmp_path):
    s = store(tmp_path, env="alice:a\nbob:b")
    assert s.sync_htpasswd() is True
    before = s.htpasswd_path.read_bytes(), s.htpasswd_path.stat().st_mtime_ns
    assert s.sync_htpasswd() is False
    # A restart: a new store, the same environment. The plain passwords' hashes are reused.
    again = store(tmp_path, env="alice:a\nbob:b")
    assert again.sync_htpasswd() is False
    assert (s.htpasswd_path.read_bytes(), s.htpasswd_path.stat().st_mtime_ns) == before
    # A changed password in the environment is a change.
    changed = store(tmp_path, env="alice:a\nbob:new")
    assert changed.sync_htpasswd() is True
    assert bcrypt.checkpw(b"new", htpasswd(changed)["bob"].encode())


def test_the_mtime_moves_forward_on_every_change(tmp_path):
    s = store(tmp_path)
    s.add("u0", "p")
    stamps = [s.htpasswd_path.stat().st_mtime_ns]
    for index in range(1, 6):
        s.add(f"u{index}", "p")  # in quick succession: often within one clock tick
        stamps.append(s.htpasswd_path.stat().st_mtime_ns)
    assert stamps == sorted(set(stamps))


def test_a_hand_edited_htpasswd_is_put_back(tmp_path):
    s = store(tmp_path, env="alice:a")
    s.sync_htpasswd()
    s.htpasswd_path.write_text("intruder:$2y$04$" + "a" * 53 + "\n")
    assert s.sync_htpasswd() is True
    assert set(htpasswd(s)) == {"alice"}


def test_initial_admin_is_created_once_and_never_logged(tmp_path):
    s = store(tmp_path)
    message = s.ensure_initial_admin()
    path = auth_dir(tmp_path / "data") / "initial-admin-password"
    assert message is not None
    assert str(path) in message
    assert f"docker exec <container> cat {path}" in message
    password = path.read_text().strip()
    assert len(password) >= 32
    assert password not in message
    assert mode(path) == 0o600
    assert s.list() == {"admin": "run-time"}
    assert bcrypt.checkpw(password.encode(), htpasswd(s)["admin"].encode())

    # A later start keeps the password, and only reminds where it is.
    later = store(tmp_path)
    reminder = later.ensure_initial_admin()
    assert reminder is not None and str(path) in reminder and password not in reminder
    assert path.read_text().strip() == password
    assert bcrypt.checkpw(password.encode(), htpasswd(later)["admin"].encode())


def test_changing_the_admin_password_deletes_the_initial_one(tmp_path):
    s = store(tmp_path)
    s.ensure_initial_admin()
    s.add("admin", "chosen by the operator")
    assert not (auth_dir(tmp_path / "data") / "initial-admin-password").exists()
    assert s.ensure_initial_admin() is None


def test_no_new_admin_after_every_user_was_removed(tmp_path):
    s = store(tmp_path)
    s.ensure_initial_admin()
    s.remove("admin")
    assert not (auth_dir(tmp_path / "data") / "initial-admin-password").exists()
    message = store(tmp_path).ensure_initial_admin()
    assert message is not None and "every request is refused" in message
    assert s.list() == {}
    assert htpasswd(s) == {}


def test_no_initial_admin_with_environment_or_run_time_users(tmp_path):
    assert store(tmp_path / "a", env="alice:a").ensure_initial_admin() is None
    s = store(tmp_path / "b")
    s.add("bob", "b")
    assert s.ensure_initial_admin() is None
    assert s.list() == {"bob": "run-time"}
    assert not (auth_dir(tmp_path / "data") / "initial-admin-password").exists()


def test_initial_password_file_without_user_is_reused(tmp_path):
    # As after a crash between writing the password file and users.json.
    s = store(tmp_path)
    auth_dir(tmp_path / "data").mkdir(parents=True)
    (auth_dir(tmp_path / "data") / "initial-admin-password").write_text(
        "already-read-by-the-operator\n"
    )
    assert s.ensure_initial_admin() is not None
    assert bcrypt.checkpw(b"already-read-by-the-operator", htpasswd(s)["admin"].encode())


@pytest.mark.parametrize(
    "content", ["not json", '{"users": []}', '{"users": {"bob": "plain"}}', "[]"]
)
def test_a_damaged_users_file_is_an_error_not_an_empty_store(tmp_path, content):
    s = store(tmp_path)
    auth_dir(tmp_path / "data").mkdir(parents=True)
    (auth_dir(tmp_path / "data") / "users.json").write_text(content)
    with pytest.raises(AuthError, match=r"users\.json"):
        s.list()
    with pytest.raises(AuthError):
        s.ensure_initial_admin()
    assert not (auth_dir(tmp_path / "data") / "initial-admin-password").exists()


def test_generated_passwords_are_hashed_at_cost_4_chosen_ones_at_10(tmp_path):
    # The product's default cost (10), not the cheap one the other tests use.
    data = tmp_path / "data"
    first = user_store(data)
    first.ensure_initial_admin()
    admin_hash = htpasswd(first)["admin"]
    assert auth.hash_cost(admin_hash) == 4
    password = (auth_dir(data) / "initial-admin-password").read_text().strip()
    assert bcrypt.checkpw(password.encode(), admin_hash.encode())

    created, generated = first.add_generated("ci")
    assert created is True and len(generated) >= 32
    assert auth.hash_cost(htpasswd(first)["ci"]) == 4
    first.add("ci", "chosen by a person")
    assert auth.hash_cost(htpasswd(first)["ci"]) == 10

    from_env = user_store(tmp_path / "env", load_env_users("alice:" + SECRET, None))
    from_env.sync_htpasswd()
    assert auth.hash_cost(htpasswd(from_env)["alice"]) == 10


def test_generated_password_has_at_least_128_bits():
    # token_urlsafe: 6 bits per character; the cost-4 rule rests on this.
    samples = {auth.generate_password() for _ in range(50)}
    assert len(samples) == 50
    assert all(len(p) * 6 >= 128 for p in samples)


def test_control_handlers(tmp_path):
    s = store(tmp_path, env="alice:a")
    handlers = auth.control_handlers(s)
    add, remove, list_users = handlers["user-add"], handlers["user-remove"], handlers["user-list"]
    assert add({"name": "bob", "password": SECRET}) == {"ok": True, "created": True}
    assert add({"name": "bob", "password": "x"}) == {"ok": True, "created": False}
    assert list_users({}) == {"ok": True, "users": {"alice": "AUTH_USERS", "bob": "run-time"}}
    answer = add({"name": "alice", "password": SECRET})
    assert answer["ok"] is False and "AUTH_USERS" in answer["error"]
    answer = add({"name": "eve", "password": SECRET * 5})
    assert answer["ok"] is False and SECRET not in json.dumps(answer)
    assert add({"name": "eve"})["ok"] is False
    generated = add({"name": "gen", "generate": True})
    assert generated["ok"] is True and generated["created"] is True
    assert bcrypt.checkpw(generated["password"].encode(), htpasswd(s)["gen"].encode())
    assert auth.hash_cost(htpasswd(s)["gen"]) == 4
    assert remove({"name": "bob"}) == {"ok": True}
    assert remove({"name": "bob"}) == {"ok": False, "error": "no user 'bob'"}
    assert remove({})["ok"] is False


def test_two_stores_on_one_directory_do_not_lose_users(tmp_path):
    # The agent and a CLI process may both change users: each change is read-modify-write
    # under the flock, so none is lost.
    import threading

    stores = [store(tmp_path) for _ in range(4)]
    threads = [
        threading.Thread(target=lambda s=s, i=i: [s.add(f"u{i}-{j}", "p") for j in range(5)])
        for i, s in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores[0].list()) == 20
    assert len(htpasswd(stores[0])) == 20
    assert not [n for n in os.listdir(stores[0].htpasswd_path.parent) if n.endswith(".tmp")]


def test_reading_the_configuration_does_not_load_bcrypt():
    # Every command reads the configuration; only those that hash need bcrypt.
    import subprocess
    import sys

    code = "import sys, acme_registry.config; print('bcrypt' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"


# -- token mode: run-time grants and the token service's password lookup --------------------


def test_runtime_grants_replace_keep_and_drop(tmp_path):
    from acme_registry.policy import Grants

    s = store(tmp_path, env="alice:a")
    handlers = auth.control_handlers(s, describe_grants=lambda name: f"grants of {name}")
    add, list_users = handlers["user-add"], handlers["user-list"]
    ci = auth.grants_record([], ["team/*"], ["team/tmp/*"], False)
    assert add({"name": "ci", "password": SECRET, "grants": ci})["ok"] is True
    assert s.runtime_grants() == {"ci": Grants(push=("team/*",), delete=("team/tmp/*",))}
    # A password reset without grant flags keeps them; new flags replace them.
    assert add({"name": "ci", "password": "new one"})["ok"] is True
    assert s.runtime_grants()["ci"].push == ("team/*",)
    nodes = auth.grants_record(["*"], [], [], True)
    assert add({"name": "ci", "password": "x", "grants": nodes})["ok"] is True
    assert s.runtime_grants()["ci"] == Grants(pull=("*",), catalog=True)
    # An environment user may get run-time grants (not a password).
    s.set_grants("alice", auth.grants_record(["public/*"], [], [], False))
    assert s.runtime_grants()["alice"].pull == ("public/*",)
    listed = list_users({})
    assert listed["grants"] == {"alice": "grants of alice", "ci": "grants of ci"}
    # A bad pattern changes nothing, not even the password.
    before = htpasswd(s)["ci"]
    bad = add(
        {"name": "ci", "password": "y", "grants": auth.grants_record(["Team/*"], [], [], False)}
    )
    assert bad["ok"] is False and "--pull" in bad["error"]
    assert htpasswd(s)["ci"] == before
    s.remove("ci")
    assert "ci" not in s.runtime_grants()


def test_a_user_added_with_grants_is_one_write(tmp_path):
    """Never stored without its grants: in between, a login (or another replica following
    the store) would get every action everywhere."""
    from acme_registry.policy import Grants

    s = store(tmp_path)
    records: list[bytes] = []
    real_store = s.storage.store

    def recording_store(key, data, **kwargs):
        if key == USERS:
            records.append(data)
        return real_store(key, data, **kwargs)

    s.storage.store = recording_store  # type: ignore[method-assign]
    handlers = auth.control_handlers(s, describe_grants=lambda name: name)
    pull_only = auth.grants_record(["team/*"], [], [], False)
    assert handlers["user-add"]({"name": "ci", "password": SECRET, "grants": pull_only})["ok"]
    assert len(records) == 1
    stored = json.loads(records[0])
    assert "ci" in stored["users"] and stored["grants"]["ci"] == pull_only
    assert s.runtime_grants() == {"ci": Grants(pull=("team/*",))}


def test_grants_are_refused_outside_token_mode(tmp_path):
    add = auth.control_handlers(store(tmp_path))["user-add"]
    answer = add({"name": "ci", "password": SECRET, "grants": auth.grants_record([], [], [], True)})
    assert answer["ok"] is False and "AUTH_MODE=token" in answer["error"]


def test_password_hash_for_the_token_service(tmp_path):
    s = store(tmp_path, env="alice:" + SECRET)
    s.sync_htpasswd()
    s.add("bob", "bob-password")
    alice = s.password_hash("alice")
    assert alice is not None and bcrypt.checkpw(SECRET.encode(), alice.encode())
    assert s.password_hash("alice") == alice  # hashed once per process
    bob = s.password_hash("bob")
    assert bob is not None and bcrypt.checkpw(b"bob-password", bob.encode())
    assert s.password_hash("nobody") is None
    # Another process (the CLI through the agent, or a second store) changes the file.
    store(tmp_path, env="alice:" + SECRET).add("bob", "changed")
    changed = s.password_hash("bob")
    assert changed is not None and bcrypt.checkpw(b"changed", changed.encode())
    s.remove("bob")
    assert s.password_hash("bob") is None


class _FlakyStorage(FileStorage):
    """A FileStorage whose reads and locks fail while ``down`` (a shared store out of
    reach); ``reads`` counts the reads of the users record."""

    down = False
    reads = 0

    def load(self, key: str) -> Versioned | None:
        if self.down:
            raise StoreUnavailable("the store is down")
        self.reads += key == USERS
        return super().load(key)

    def lock(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreUnavailable("the store is down")
        return super().lock(name, *args, **kwargs)


def test_logins_read_the_last_users_while_the_store_is_down(tmp_path: Path) -> None:
    storage = _FlakyStorage(tmp_path)
    store = UserStore(storage, tmp_path / "auth" / "htpasswd", cost=4)
    store.add("alice", "alice-password")
    store.set_grants("alice", {"pull": ["team/*"]})
    hashed = store.password_hash("alice")
    storage.down = True
    # Token mode's reads at every login: the state last read, not an error.
    assert store.password_hash("alice") == hashed
    assert set(store.runtime_grants()) == {"alice"}
    fresh = UserStore(storage, tmp_path / "auth" / "htpasswd", cost=4)
    with pytest.raises(StoreUnavailable):
        fresh.password_hash("alice")  # nothing read yet: nothing to fall back on


def test_followed_users_are_read_from_memory_and_after_a_start_with_the_store_down_from_the_copy(
    tmp_path: Path,
) -> None:
    storage = _FlakyStorage(tmp_path / "store")
    data = tmp_path / "data"
    env = {"ci": Credential("ci-password", hashed=False, source="AUTH_USERS")}

    def replica() -> UserStore:
        return UserStore(
            storage,
            data / HTPASSWD_FILE,
            env,
            cost=4,
            followed_copy=data / USERS_COPY_FILE,
        )

    store = replica()
    store.add("alice", "alice-password")
    store.set_grants("alice", {"pull": ["team/*"]})
    store.refresh()  # what the agent does at start and when the change record moves
    assert (data / USERS_COPY_FILE).stat().st_mode & 0o777 == 0o600
    reads = storage.reads
    for _ in range(5):  # logins: from memory, never a read of the store
        assert store.password_hash("alice") is not None
        assert set(store.runtime_grants()) == {"alice"}
    assert storage.reads == reads
    # Another replica changes a password: seen at this one's next refresh().
    replica().add("alice", "new-password")
    store.refresh()
    changed = store.password_hash("alice")
    assert changed is not None and bcrypt.checkpw(b"new-password", changed.encode())

    # A restart while the store is down: the copy answers, and the environment's plain
    # password is checked against the hash in the htpasswd file.
    storage.down = True
    restarted = replica()
    assert restarted.password_hash("alice") == changed
    assert set(restarted.runtime_grants()) == {"alice"}
    ci = restarted.password_hash("ci")
    assert ci is not None and bcrypt.checkpw(b"ci-password", ci.encode())
    (data / USERS_COPY_FILE).unlink()
    with pytest.raises(OSError, match="no users were read before"):
        replica().runtime_grants()
