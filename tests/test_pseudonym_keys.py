"""Pseudonym keys: weak keys are refused outside DRY_RUN, and rotation keeps old pseudonyms."""

from __future__ import annotations

import hmac

import pytest

from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.observability.pseudonym import Pseudonymizer

OLD = "old-pseudonym-key-0123456789abcdef0123"
NEW = "new-pseudonym-key-0123456789abcdef0123"


@pytest.mark.parametrize(
    "key", ["change-me-in-production", "short", "test-pseudonym-key", "x" * 31]
)
def test_a_published_or_short_key_is_a_startup_error_outside_dry_run(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LUKHAS_PSEUDONYM_KEY": key})
    assert caught.value.variable == "LUKHAS_PSEUDONYM_KEY"
    assert key not in str(caught.value)  # the error never echoes a key
    with pytest.raises(ConfigError):
        Settings.from_env({"LUKHAS_PSEUDONYM_KEYS": f"{NEW},{key}"})


def test_dry_run_accepts_any_key() -> None:
    settings = Settings.from_env({"LUKHAS_DRY_RUN_MODE": "1", "LUKHAS_PSEUDONYM_KEY": "k"})
    assert settings.pseudonym_key == "k"


def test_keys_list_the_current_key_first() -> None:
    settings = Settings.from_env({"LUKHAS_PSEUDONYM_KEYS": f" {NEW} , {OLD} "})
    assert settings.pseudonym_key == NEW
    assert settings.pseudonym_previous_keys == (OLD,)


def test_both_variables_or_a_repeated_key_are_refused() -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({"LUKHAS_PSEUDONYM_KEYS": NEW, "LUKHAS_PSEUDONYM_KEY": NEW})
    with pytest.raises(ConfigError):
        Settings.from_env({"LUKHAS_PSEUDONYM_KEYS": f"{NEW},{NEW}"})


def test_rotation_writes_with_the_new_key_and_still_finds_the_old_pseudonym() -> None:
    before = Pseudonymizer(OLD)
    after = Pseudonymizer(NEW, previous=[OLD])
    assert after("u1") != before("u1")
    assert after.all_versions("u1") == (after("u1"), before("u1"))
    assert after.versions == 2
    assert OLD not in repr(after) and NEW not in repr(after)


def test_a_pseudonym_is_the_keyed_hmac_sha256_of_the_user_id_under_every_key() -> None:
    current, earlier = "c" * 40, "e" * 40
    pseudonymize = Pseudonymizer(current, previous=[earlier])

    def expected(key: str, user_id: str) -> str:
        return "psn_" + hmac.digest(key.encode(), user_id.encode(), "sha256")[:16].hex()

    for user_id in ("alice", "bob", "ünïcode"):
        assert pseudonymize(user_id) == expected(current, user_id)
        assert pseudonymize.all_versions(user_id) == (expected(current, user_id),
                                                      expected(earlier, user_id))
