"""Admission limits (coordinator/admission.py): each one refuses with its own name, and slots
are given back however the call ends."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from coordinator.admission import TOKEN_ID_BYTES, Admission, LimitExceeded, Limits, prompt_bytes
from omni_rpc.v1 import generate_pb2

BIG = 1_000_000


def limits(**overrides: int) -> Limits:
    values = {
        "max_prompt_bytes": BIG,
        "max_tokens_cap": BIG,
        "max_streams": BIG,
        "max_streams_per_client": BIG,
        "max_queue": BIG,
    }
    values.update(overrides)
    return Limits(**values)


def admission(capacity: int = BIG, **overrides: int) -> Admission:
    return Admission(limits(**overrides), lambda: capacity)


def request(
    prompt: str = "", token_ids: tuple[int, ...] = (), max_tokens: int | None = None
) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(prompt=prompt, prompt_token_ids=token_ids)
    if max_tokens is not None:
        req.sampling.max_tokens = max_tokens
    return req


# -- request size -------------------------------------------------------------------------------


def test_prompt_bytes_counts_utf8_and_four_bytes_per_token_id() -> None:
    assert TOKEN_ID_BYTES == 4
    assert prompt_bytes(request("abc")) == 3
    assert prompt_bytes(request("é")) == 2
    assert prompt_bytes(request("€")) == 3
    assert prompt_bytes(request("😀")) == 4
    assert prompt_bytes(request(token_ids=(1, 2, 3))) == 12
    # Large ids are still 4 bytes each (int32 on the wire), whatever their varint size.
    assert prompt_bytes(request(token_ids=(2**31 - 1, 0))) == 8
    assert prompt_bytes(request("ab", (7,))) == 6


def test_prompt_at_the_limit_passes_and_one_byte_over_is_refused() -> None:
    adm = admission(max_prompt_bytes=10)
    adm.check_request(request("é" * 5))  # 10 bytes in UTF-8, 5 characters
    with pytest.raises(LimitExceeded) as err:
        adm.check_request(request("é" * 5 + "a"))
    assert str(err.value) == "prompt is 11 bytes, over the limit max_prompt_bytes=10"


def test_token_id_prompts_count_four_bytes_per_id() -> None:
    adm = admission(max_prompt_bytes=10)
    adm.check_request(request(token_ids=(1, 2)))  # 8 bytes
    with pytest.raises(LimitExceeded, match=r"prompt is 12 bytes.*max_prompt_bytes=10"):
        adm.check_request(request(token_ids=(1, 2, 3)))


def test_characters_are_not_bytes() -> None:
    # 4 characters, 16 bytes: a limit on characters would let this through.
    with pytest.raises(LimitExceeded, match="max_prompt_bytes=15"):
        admission(max_prompt_bytes=15).check_request(request("😀" * 4))


def test_max_tokens_cap() -> None:
    adm = admission(max_tokens_cap=100)
    adm.check_request(request("x", max_tokens=100))
    adm.check_request(request("x"))  # unset: the server default applies later
    with pytest.raises(LimitExceeded) as err:
        adm.check_request(request("x", max_tokens=101))
    assert str(err.value) == "max_tokens=101 is over the limit max_tokens_cap=100"


def test_check_request_holds_no_slot() -> None:
    adm = admission(max_prompt_bytes=1)
    with pytest.raises(LimitExceeded):
        adm.check_request(request("too long"))
    assert adm.active == 0
    assert adm._per_client == {}


# -- concurrent streams -------------------------------------------------------------------------


def test_max_streams() -> None:
    adm = admission(max_streams=2)
    with ExitStack() as stack:
        stack.enter_context(adm.admit("a"))
        stack.enter_context(adm.admit("b"))
        assert adm.active == 2
        with pytest.raises(LimitExceeded) as err:
            stack.enter_context(adm.admit("c"))
        assert "max_streams=2" in str(err.value)
        assert "max_streams_per_client" not in str(err.value)
        assert str(err.value).startswith("2 streams in flight")
        # A refusal takes nothing: no slot, no entry for the refused client.
        assert adm.active == 2
        assert adm._per_client == {"a": 1, "b": 1}
    assert adm.active == 0
    with adm.admit("c"):
        assert adm.active == 1


def test_max_streams_per_client() -> None:
    adm = admission(max_streams_per_client=2)
    with ExitStack() as stack:
        stack.enter_context(adm.admit("a"))
        stack.enter_context(adm.admit("a"))
        with pytest.raises(LimitExceeded) as err:
            stack.enter_context(adm.admit("a"))
        assert "this client has 2 streams in flight" in str(err.value)
        assert "max_streams_per_client=2" in str(err.value)
        # Other clients are not affected.
        stack.enter_context(adm.admit("b"))
        stack.enter_context(adm.admit("b"))
        assert adm._per_client == {"a": 2, "b": 2}
        assert adm.active == 4
    assert adm._per_client == {}


def test_max_queue_beyond_capacity() -> None:
    capacity = 2
    adm = Admission(limits(max_queue=1), lambda: capacity)
    with ExitStack() as stack:
        for client in ("a", "b", "c"):  # two run, one waits in the queue
            stack.enter_context(adm.admit(client))
        with pytest.raises(LimitExceeded) as err:
            stack.enter_context(adm.admit("d"))
        message = str(err.value)
        assert "3 requests for a capacity of 2" in message
        assert "max_queue=1" in message
        # The capacity is read on every admission: a node joining makes room at once.
        capacity = 3
        stack.enter_context(adm.admit("d"))
        assert adm.active == 4
        capacity = 0  # every node gone: active (4) >= 0 + 1
        with pytest.raises(LimitExceeded, match="capacity of 0"):
            stack.enter_context(adm.admit("e"))
    assert adm.active == 0


def test_no_capacity_and_no_queue_refuses_everything() -> None:
    adm = admission(capacity=0, max_queue=0)
    with pytest.raises(LimitExceeded, match="max_queue=0"), adm.admit("a"):
        pass  # pragma: no cover
    assert adm.active == 0


def test_no_capacity_still_queues_up_to_max_queue() -> None:
    adm = admission(capacity=0, max_queue=2)
    with adm.admit("a"), adm.admit("b"):
        with pytest.raises(LimitExceeded, match="max_queue=2"), adm.admit("c"):
            pass  # pragma: no cover
        assert adm.active == 2


def test_max_streams_is_checked_before_the_per_client_limit() -> None:
    adm = admission(max_streams=1, max_streams_per_client=1)
    with adm.admit("a"), pytest.raises(LimitExceeded) as err, adm.admit("a"):
        pass  # pragma: no cover
    assert "max_streams=1" in str(err.value)


# -- release ------------------------------------------------------------------------------------


def test_slot_released_on_normal_exit() -> None:
    adm = admission(max_streams=1)
    for _ in range(3):
        with adm.admit("a"):
            assert adm.active == 1
            assert adm._per_client == {"a": 1}
        assert adm.active == 0
        assert adm._per_client == {}


def test_slot_released_when_the_call_raises() -> None:
    adm = admission(max_streams=1, max_streams_per_client=1)
    with pytest.raises(RuntimeError, match="boom"), adm.admit("a"):
        raise RuntimeError("boom")
    assert adm.active == 0
    assert adm._per_client == {}
    with adm.admit("a"):  # the slot is really free again
        pass


def test_release_of_one_of_several_streams_keeps_the_client_count() -> None:
    adm = admission()
    with adm.admit("a"):
        with adm.admit("a"):
            assert adm._per_client == {"a": 2}
        assert adm._per_client == {"a": 1}
        assert adm.active == 1
    assert adm._per_client == {}


def test_per_client_map_forgets_idle_identities() -> None:
    """Memory stays bounded however many distinct clients come and go."""
    adm = admission(max_streams=8, max_streams_per_client=1)
    for i in range(10_000):
        with adm.admit(f"client-{i}"):
            pass
    assert adm._per_client == {}
    assert adm.active == 0
    # With some in flight, the map holds exactly those.
    with ExitStack() as stack:
        for i in range(5):
            stack.enter_context(adm.admit(f"live-{i}"))
        for i in range(1000):
            with adm.admit(f"passing-{i}"):
                pass
        assert adm._per_client == {f"live-{i}": 1 for i in range(5)}
    assert adm._per_client == {}


def test_refused_identities_leave_no_trace() -> None:
    adm = admission(max_streams=1)
    with adm.admit("holder"):
        for i in range(1000):
            with pytest.raises(LimitExceeded), adm.admit(f"refused-{i}"):
                pass  # pragma: no cover
        assert adm._per_client == {"holder": 1}
    assert adm._per_client == {}
