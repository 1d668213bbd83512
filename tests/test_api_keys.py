"""API keys of `torchnode api` (api/auth.py): parsing, and what a request must present. The HTTP side (401 in
OpenAI's shape, the chat page asking once) is tested on a real server in test_chat_page.py."""

from __future__ import annotations

import pytest

from torchnode.api.auth import ApiKeyError, ApiKeys, keys_from_environment, read_key_file
from torchnode.api.errors import ApiError


def test_open_without_keys_and_bearer_only_with_them():
    ApiKeys().check(None)  # no keys: every request is let in
    keys = ApiKeys(["sk-one", "sk-two", "sk-one"])
    assert keys.keys == ("sk-one", "sk-two")
    keys.check("Bearer sk-two")
    keys.check("bearer  sk-one ")
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-one", "Bearer sk-on", "Bearer sk-one-more", "sk-one"):
        with pytest.raises(ApiError) as e:
            keys.check(bad)
        assert e.value.status == 401 and e.value.detail.code == "invalid_api_key"
        assert e.value.headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("bad", ["", "has space", "tab\tkey", "é-key", "x" * 513])
def test_keys_that_cannot_travel_in_a_header_are_refused(bad):
    with pytest.raises(ApiKeyError, match="--api-key"):
        ApiKeys([bad])


def test_key_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-a\n\n  sk-b  # laptop\n")
    assert read_key_file(path) == ["sk-a", "sk-b"]
    path.write_text("# nothing\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        read_key_file(path)
    with pytest.raises(ApiKeyError, match="cannot read"):
        read_key_file(tmp_path / "missing")
    monkeypatch.setenv("TORCHNODE_API_KEY", "sk-x  sk-y")
    assert keys_from_environment() == ["sk-x", "sk-y"]
    monkeypatch.delenv("TORCHNODE_API_KEY")
    assert keys_from_environment() == []
