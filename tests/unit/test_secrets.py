"""Masking: URL passwords, key=value secrets, and known values."""

from __future__ import annotations

from tasks.secrets import mask_text, mask_url


def test_mask_url_keeps_user_host_port_and_path() -> None:
    assert mask_url("postgresql://app:pa%40ss@db:5432/x?sslmode=require") == (
        "postgresql://app:***@db:5432/x?sslmode=require"
    )
    assert mask_url("redis://:onlypass@cache:6379/2") == "redis://:***@cache:6379/2"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_mask_text_masks_urls_pairs_and_known_values() -> None:
    text = (
        "connect postgresql://app:hunter2@db/x failed; PGPASSWORD=hunter2 "
        "password='with space' api_key: abc123 token=t0k3n and rawvalue123"
    )
    masked = mask_text(text, ["rawvalue123"])
    for secret in ("hunter2", "with space", "abc123", "t0k3n", "rawvalue123"):
        assert secret not in masked
    assert "postgresql://app:***@db/x" in masked


def test_short_known_values_are_not_masked_everywhere() -> None:
    # A one- or two-character "secret" would mask every occurrence of common letters.
    assert mask_text("a normal line", ["a"]) == "a normal line"
