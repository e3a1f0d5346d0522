"""Where the aligned draft's KV is valid: prefill, catch-up, off rounds, radix hits."""

from __future__ import annotations

import torch

from sglang_dsde.core.round_cost import catch_up_tokens
from sglang_dsde.draft_kv import CURRENT, DraftKVLedger


def table(rows: int, width: int) -> torch.Tensor:
    """A ``req_to_token`` stand-in: row r, position p -> KV slot 100 r + p."""
    return (100 * torch.arange(rows).unsqueeze(1) + torch.arange(width)).to(torch.int32)


def test_prefill_leaves_a_request_one_token_behind_and_a_drafting_round_makes_it_current():
    ledger = DraftKVLedger(4, 1000)
    ledger.on_slots_allocated([1, 2])
    ledger.after_prefill([1, 2], [0, 0], [7, 3])
    assert ledger.valid_len[1] == 7 and ledger.gap[1] == 1
    # Round at committed lengths 7 and 3 (the bonus tokens): each extends its bonus only.
    assert ledger.catch_up_prefixes([1, 2], [7, 3]) == [7, 3]
    assert ledger.pending_tokens([1, 2]) == 2
    ledger.on_drafting_round([1, 2], torch.tensor([1, 2]))
    assert ledger.valid_len[1] == CURRENT and ledger.pending_tokens([1, 2]) == 0
    assert ledger.catch_up_prefixes([1, 2], [11, 5]) is None


def test_off_rounds_grow_the_gap_and_clear_the_bits_of_tokens_the_draft_never_saw():
    req_to_token = table(4, 64)
    ledger = DraftKVLedger(4, 1000)
    ledger.on_slots_allocated([1])
    ledger.after_prefill([1], [0], [5])
    ledger.mark_written(req_to_token[1, :5])
    ledger.on_drafting_round([1], torch.tensor([1]))  # draft KV through the bonus at 5
    ledger.mark_written(req_to_token[1, 5:6])
    rows = torch.tensor([1])
    for committed in (6, 7, 8):  # three off rounds: the target commits 6, 7, 8
        ledger.on_off_round([1], [committed], rows, req_to_token[1, committed:committed + 1])
    # Current at the first off round: its bonus at 6 had draft KV; 7 and 8 never did.
    assert ledger.valid_len[1] == 7 and ledger.gap[1] == 3
    assert ledger.draft_ok[req_to_token[1, :9].long()].tolist() == [True] * 6 + [False] * 3
    assert ledger.catch_up_prefixes([1], [9]) == [7]  # extends 7, 8 and the bonus at 9


def test_a_radix_hit_on_never_written_draft_kv_is_behind_from_the_first_such_slot():
    req_to_token = table(4, 64)
    ledger = DraftKVLedger(4, 1000)
    ledger.mark_written(req_to_token[0, :20])
    ledger.mark_invalid(req_to_token[0, 12:14])
    # Slot 3 reuses slot 0's first 16 KV slots (a radix hit) and prefills 16 .. 24.
    req_to_token[3, :16] = req_to_token[0, :16]
    ledger.on_slots_allocated([3, 2])
    prefix = [16, 0]
    check = ledger.rows_to_check([3, 2], prefix)
    assert check == [0]
    found = ledger.first_invalid(req_to_token, torch.tensor([3]), [16])
    assert found == [12]
    ledger.after_prefill([3, 2], prefix, [25, 4], dict(zip(check, found)))
    assert ledger.valid_len[3] == 12 and ledger.radix_repairs == 1
    assert ledger.gap[3] == 25 + 1 - 12 and ledger.valid_len[2] == 4
    assert ledger.catch_up_prefixes([3, 2], [25, 4]) == [12, 4]


def test_catch_up_tokens_count_gaps_and_the_current_requests_bonus_once_any_is_behind():
    assert catch_up_tokens([0, 0, 0]) == 0
    assert catch_up_tokens([3, 0, 1]) == 3 + 1 + 1
    assert catch_up_tokens([]) == 0


def test_a_deferred_prefill_leaves_the_prompt_to_the_catch_up_and_radix_hits_see_it():
    req_to_token = table(4, 64)
    ledger = DraftKVLedger(4, 1000)
    ledger.mark_written(req_to_token[1, :30])       # a previous owner's draft KV there
    ledger.on_slots_allocated([1])
    ledger.mark_invalid(req_to_token[1, :10])       # the deferred prefill's chunk
    ledger.after_prefill([1], [0], [10], extended=False)
    assert ledger.valid_len[1] == 0 and ledger.gap[1] == 11
    assert ledger.catch_up_prefixes([1], [10]) == [0]  # the prompt and the bonus token
    # A second chunk, also deferred: still behind from 0.
    ledger.mark_invalid(req_to_token[1, 10:16])
    assert ledger.rows_to_check([1], [10]) == [0]
    found = ledger.first_invalid(req_to_token, torch.tensor([1]), [10])
    ledger.after_prefill([1], [10], [16], dict(zip([0], found)), extended=False)
    assert ledger.valid_len[1] == 0 and ledger.gap[1] == 17 and ledger.radix_repairs == 0
    # Another request reusing that prompt (a radix hit) is behind from 0 too.
    req_to_token[2, :16] = req_to_token[1, :16]
    ledger.on_slots_allocated([2])
    assert ledger.first_invalid(req_to_token, torch.tensor([2]), [16]) == [0]
    # A current request's deferred chunk after an extended one keeps its valid prefix.
    ledger.on_slots_allocated([3])
    ledger.after_prefill([3], [0], [8])
    ledger.mark_written(req_to_token[3, :8])
    ledger.mark_invalid(req_to_token[3, 8:12])
    ledger.after_prefill([3], [8], [12], extended=False)
    assert ledger.valid_len[3] == 8 and ledger.catch_up_prefixes([3], [12]) == [8]
