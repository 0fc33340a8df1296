"""Protocols as step sequences: pure tests, no emulator."""

from __future__ import annotations

import pytest

from textpoke.protocols import (
    BP_MUTATIONS,
    ModCode,
    PatchRequest,
    Poke,
    Publish,
    Release,
    Rendezvous,
    Sync,
    Withdraw,
    build,
    describe_steps,
    naive_atomic,
    naive_bytes,
    stop_machine,
    text_poke_bp,
    text_poke_bp_batch,
)

NOP = bytes.fromhex("0f1f440000")


def call(rel: int) -> bytes:
    return b"\xe8" + rel.to_bytes(4, "little", signed=True)


CALL = call(0x100)


def reqs(n: int, new: bytes = CALL) -> list[PatchRequest]:
    return [PatchRequest(0x1000 + 64 * i, NOP, new) for i in range(n)]


def kinds(steps):
    return [
        type(s).__name__ + (f":{s.label}" if isinstance(s, Sync) else f":{s.phase}" if isinstance(s, Poke) else "")
        for s in steps
    ]


def test_text_poke_bp_is_int3_sync_tail_sync_first_sync():
    """One site: publish, int3, sync, tail, sync, first byte, sync, withdraw."""
    (r,) = reqs(1)
    assert kinds(text_poke_bp([r])) == [
        "Publish",
        "Poke:int3",
        "Sync:int3",
        "Poke:tail",
        "Sync:tail",
        "Poke:first",
        "Sync:first",
        "Withdraw",
    ]
    steps = text_poke_bp([r])
    assert steps[1].data == b"\xcc" and steps[3].data == r.new[1:] and steps[3].offset == 1
    assert steps[5].data == r.new[:1]


def test_batch_has_three_syncs_whatever_its_size():
    for n in (1, 2, 56, 200):
        steps = text_poke_bp_batch(reqs(n))
        assert sum(isinstance(s, Sync) for s in steps) == 3
        assert sum(isinstance(s, Poke) for s in steps) == 3 * n


def test_single_site_protocol_costs_three_syncs_per_site():
    """Bristot's anchor: 56 sites one by one is 168 syncs."""
    assert sum(isinstance(s, Sync) for s in text_poke_bp(reqs(56))) == 168


def test_no_tail_step_when_the_tail_is_unchanged():
    r = PatchRequest(0x1000, bytes.fromhex("e900000000"), bytes.fromhex("e800000000"))
    steps = text_poke_bp_batch([r])
    assert kinds(steps) == ["Publish", "Poke:int3", "Sync:int3", "Poke:first", "Sync:first", "Withdraw"]


def test_stop_machine_and_naive_shapes():
    rs = reqs(2)
    sm = stop_machine(rs)
    assert [type(s) for s in sm] == [Rendezvous, Poke, Poke, Poke, Poke, Release]
    # text_poke's memcpy: 4 bytes, then the last one, as the rest of the same copy
    assert [(len(s.data), s.part) for s in sm[1:-1]] == [(4, False), (1, True)] * 2
    assert all(isinstance(s, Poke) for s in naive_atomic(rs)) and len(naive_atomic(rs)) == 2
    nb = naive_bytes(rs)
    assert len(nb) == 6 and all(len(s.data) == 1 for s in nb)  # only the bytes that change


@pytest.mark.parametrize("name", list(BP_MUTATIONS))
def test_every_mutation_changes_the_protocol(name):
    good = text_poke_bp(reqs(2))
    bad = build("bp", reqs(2), name)
    assert bad != good
    assert sorted(map(repr, bad)) == sorted(map(repr, good)) or len(bad) < len(good)


def test_mutations_do_what_they_say():
    (r,) = reqs(1)
    k = kinds(build("bp", [r], "tail-before-int3"))
    assert k.index("Poke:tail") < k.index("Poke:int3")
    k = kinds(build("bp", [r], "first-before-tail"))
    assert k.index("Poke:first") < k.index("Poke:tail")
    k = kinds(build("bp", [r], "early-withdraw"))
    assert k.index("Withdraw") < k.index("Sync:first")
    assert "Sync:int3" not in kinds(build("bp", [r], "no-sync-after-int3"))


def test_requests_must_keep_the_length():
    with pytest.raises(ValueError, match="same length"):
        PatchRequest(0x1000, NOP, b"\x90")


def test_steps_print():
    lines = describe_steps(text_poke_bp(reqs(1)))
    assert lines[0].startswith("publish") and "cc" in lines[1] and lines[2] == "sync  (int3)"
    assert isinstance(text_poke_bp(reqs(1))[0], Publish) and isinstance(text_poke_bp(reqs(1))[-1], Withdraw)


def test_no_nmi_write_only_withdraws_the_nmi_side_write():
    good = build("stop-machine-ftrace", reqs(2))
    bad = build("stop-machine-ftrace", reqs(2), "no-nmi-write")
    assert len(bad) == len(good) and bad != good
    mods = [s for s in bad if isinstance(s, ModCode)]
    assert len(mods) == 2 and not any(s.nmi_write for s in mods)
    assert all(s.nmi_write for s in good if isinstance(s, ModCode))
