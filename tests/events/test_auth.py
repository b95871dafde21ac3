"""What a bad token is told: one plain reason, never a codec's complaint about it."""

from __future__ import annotations

import pytest

from canvas_events.auth import NOT_A_JWT, decode_token, mint_token
from canvas_events.errors import AuthError

SECRET = "auth-tests-secret-0123456789-abcdefghijklmnopq"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "abcd.abcd.abcd",  # PyJWT: "Invalid header string: 'utf-8' codec can't decode ..."
        "aaaa.eyJzdWIiOiJ4In0.sig",
        "garbage.garbage.garbage",  # PyJWT: "Invalid header padding"
        "eyJhbGciOiJIUzI1NiJ9.!!!.sig",
    ],
)
def test_a_token_that_is_not_a_jwt_is_called_that(token: str) -> None:
    with pytest.raises(AuthError) as raised:
        decode_token(token, SECRET)
    assert str(raised.value) == NOT_A_JWT
    assert "codec" not in str(raised.value)


def test_a_token_signed_with_another_secret_says_so() -> None:
    token = mint_token("alice", "another-secret-0123456789-abcdefghijklmnop")
    with pytest.raises(AuthError, match=r"^invalid token: Signature verification failed$"):
        decode_token(token, SECRET)
