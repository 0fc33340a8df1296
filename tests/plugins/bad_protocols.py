"""Protocols a user could get wrong, one mistake each (used by tests/test_user_protocols.py)."""

from __future__ import annotations

from textpoke.protocols import Poke, Publish, Release, Rendezvous, Sync, Withdraw, text_poke_bp_batch


def _first(requests):
    return sorted(requests, key=lambda r: r.site)[0]


def not_a_step(requests):
    return [*text_poke_bp_batch(requests)[:2], "sync please"]


def raises(requests):
    return 1 // 0


def returns_none(requests):
    return None


def returns_generator(requests):
    return (s for s in text_poke_bp_batch(requests))


def poke_elsewhere(requests):
    r = _first(requests)
    return [Poke(r.site - 16, 0, r.new, "write")]


def wrong_length(requests):
    r = _first(requests)
    return [Poke(r.site, 1, r.new, "write")]


def release_without_rendezvous(requests):
    return [*(Poke(r.site, 0, r.new, "write") for r in requests), Release()]


def unknown_label(requests):
    return [Sync("everything") if isinstance(s, Sync) else s for s in text_poke_bp_batch(requests)]


def forgets_first_byte(requests):
    return [s for s in text_poke_bp_batch(requests) if not (isinstance(s, Poke) and s.phase == "first")]


def sync_while_stopped(requests):
    return [Rendezvous(), *(Poke(r.site, 0, r.new, "write") for r in requests), Sync("write"), Release()]


def never_released(requests):
    return [Rendezvous(), *(Poke(r.site, 0, r.new, "write") for r in requests)]


def withdraw_unpublished(requests):
    return [Withdraw(), *(Poke(r.site, 0, r.new, "write") for r in requests)]


def publishes_a_stranger(requests):
    r = _first(requests)
    stranger = type(r)(r.site - 16, r.old, r.new)
    return [Publish((stranger,)), *(Poke(q.site, 0, q.new, "write") for q in requests), Withdraw()]


def atomic_whole_store(requests):
    """Valid, and NMI-unsafe: each site's new instruction in one store, no sync (like naive-atomic)."""
    return [Poke(r.site, 0, r.new, "write") for r in requests]


def keeps_descriptors(steps):
    """A mutation that drops the Withdraw."""
    return [s for s in steps if not isinstance(s, Withdraw)]


NOT_CALLABLE = 42
