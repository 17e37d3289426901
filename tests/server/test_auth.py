"""Where the token comes from, and what counts as a loopback host."""

from __future__ import annotations

import stat
import sys

import pytest

from engine.server.auth import TokenError, is_loopback, load_token, token_matches


def test_explicit_token_wins_and_is_not_written_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    source = load_token("s3cret-0123456789", None)
    assert (source.token, source.path, source.explicit, source.generated) == (
        "s3cret-0123456789",
        None,
        True,
        False,
    )
    assert not any(tmp_path.iterdir())


def test_generated_token_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    first = load_token(None, None)
    assert first.generated and not first.explicit and len(first.token) >= 32
    if sys.platform != "win32":
        assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    second = load_token(None, None)
    assert second.token == first.token and not second.generated


def test_token_file_is_read_or_created(tmp_path):
    given = tmp_path / "given"
    given.write_text("from-the-user-0123456789\n")
    given.chmod(0o600)  # an existing token file must be private (tests/server/test_hardening.py)
    assert load_token(None, given).token == "from-the-user-0123456789"
    assert given.read_text() == "from-the-user-0123456789\n"  # untouched
    created = load_token(None, tmp_path / "new" / "token")
    assert created.generated and created.path.read_text().strip() == created.token


def test_unusable_tokens_are_refused_with_a_message(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(TokenError, match="empty"):
        load_token(None, empty)
    with pytest.raises(TokenError, match="empty"):
        load_token("   ", None)
    with pytest.raises(TokenError, match="either"):
        load_token("a", empty)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_token_matches_is_exact():
    assert token_matches("abc", "abc")
    assert (
        not token_matches("abc", "abcd")
        and not token_matches("ab", "abc")
        and not token_matches("é", "e")
    )
