"""Touch-point: a request admitted to a speculative server fits its KV cache to the end.

Read against SGLang 0.5.23. ``Scheduler.init_req_max_new_tokens`` bounds every new request
by the KV pool: ``max_new_tokens`` is clipped to ``max_req_len - input_len - 1`` and
``max_new_tokens_for_memory`` (a prompt that cannot fit is aborted with a 400). That bound
counts one KV slot per generated token, as a plain decode step allocates. A speculative
decode step of the V2 path allocates more: ``eagle_prepare_for_decode`` keeps every
request's KV allocation ``get_alloc_reserve_per_decode()`` slots past its committed length
(``mem_cache/allocation_sizing.py``: 2 x max(steps x topk, largest verify width); with
DSDE the largest width is ``--dsde-max-steps + 1``, so 22 slots at the default 10). A
request near the pool's size is admitted, decodes for minutes, and then its last rounds
cannot allocate: ``retract_decode`` aborts it with HTTP 500 "Out of memory even after
retracting all other requests", its output lost (STANDALONE alike; a plain server
completes it).

An AROUND hook completes the bound at admission, for speculative servers only: the last
decode round starts with ``input_len + max_new_tokens - 1`` committed tokens and needs
the reserve beyond them, so ``max_new_tokens <= capacity - input_len - reserve + 1``.

* If SGLang already clipped ``max_new_tokens`` (the client asked for more than the pool,
  or for no limit), it is clipped further to that bound, as SGLang does (the output ends
  with finish reason ``length``).
* If the client's own ``max_new_tokens`` fit SGLang's bound but not this one, the request
  is refused up front with a 400 naming the numbers and the largest value that fits: it
  would run to the end on a plain server, so a silent cut would lose output.

Every request admitted then completes: one request alone always fits, and SGLang's
retraction handles several.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

from http import HTTPStatus

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = (
    "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
    "sglang.srt.mem_cache.allocation_sizing.get_alloc_reserve_per_decode",
    "sglang.srt.managers.schedule_batch.Req.set_finish_with_abort",
)



def apply() -> None:
    register_once(__name__, [(HOOKED_SYMBOLS[0], _fit_decode_reserve, "AROUND")])


def largest_max_new_tokens(capacity: int, input_len: int, reserve: int,
                           page_size: int = 1) -> int:
    """The largest ``max_new_tokens`` whose last decode round (``input_len +
    max_new_tokens - 1`` committed, ``reserve`` more allocated, rounded up to whole
    pages) fits ``capacity`` KV slots; may be <= 0."""
    usable = capacity // page_size * page_size
    return usable - reserve - input_len + 1


def _fit_decode_reserve(original, scheduler, req, *args, **kwargs):
    requested = req.sampling_params.max_new_tokens
    result = original(scheduler, req, *args, **kwargs)
    if scheduler.spec_algorithm.is_none() or getattr(req, "to_finish", None) is not None:
        return result
    from sglang.srt.mem_cache.allocation_sizing import get_alloc_reserve_per_decode

    reserve = int(get_alloc_reserve_per_decode())
    widening = int(getattr(scheduler, "kv_shard_widening", 1) or 1)
    page_size = int(getattr(scheduler, "page_size", 1) or 1)
    capacity = scheduler.max_total_num_tokens * widening - page_size * (widening - 1)
    input_len = len(req.origin_input_ids)
    params = req.sampling_params
    fits = largest_max_new_tokens(capacity, input_len, reserve, page_size)
    if params.max_new_tokens <= max(fits, 0):
        return result
    clipped_by_sglang = requested is None or params.max_new_tokens < requested
    if clipped_by_sglang and fits > 0:
        params.max_new_tokens = fits
        params.min_new_tokens = min(params.min_new_tokens, fits)
        return result
    req.set_finish_with_abort(
        f"The request does not fit the KV cache of this speculative server: prompt "
        f"({input_len} tokens) + max_new_tokens ({params.max_new_tokens}) + the speculative "
        f"decode reserve ({reserve} tokens) exceed the {capacity} tokens of the KV pool "
        f"(--max-total-tokens); the largest max_new_tokens that fits is {max(fits, 0)}",
        status_code=HTTPStatus.BAD_REQUEST)
    params.max_new_tokens = 0
    return result
