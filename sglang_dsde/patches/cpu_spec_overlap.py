"""Touch-point: SGLang's overlap scheduler for the speculative path on a CPU.

Read against SGLang 0.5.23. With overlap scheduling the next round's draft inputs come
back from ``FutureMap``, whose ``_resolve_spec_extras`` gathers them by row with one
fused Triton kernel (``kernels/ops/speculative/gather_spec_extras.py``), which needs a
GPU driver. On a CPU this AROUND hook answers with the same gather in torch (an
``index_select`` per buffer, same shapes and dtypes); elsewhere it calls the kernel.

SGLang turns overlap scheduling off for its own speculative algorithms on a CPU; DSDE
keeps it on (``sglang_dsde.args``): on this machine a server without overlap
scheduling decodes ~30% slower (docs/cpu.md), which no speculation length wins back when
the draft is poor, so the free off would otherwise cost that much against a plain server.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = (
    "sglang.kernels.ops.speculative.gather_spec_extras.gather_spec_extras",
    "sglang.srt.managers.overlap_utils.FutureMap._resolve_spec_extras",
)



def _gather_rows(buf, indices):
    if buf is None:
        return None
    return buf.index_select(0, indices.to(buf.device, dtype=indices.dtype))


def _around_gather(original, indices, topk_p_buf, topk_index_buf, output_tokens_buf,
                   hidden_states_buf):
    if indices.device.type != "cpu":
        return original(indices, topk_p_buf, topk_index_buf, output_tokens_buf,
                        hidden_states_buf)
    indices = indices.contiguous().long()
    return (_gather_rows(topk_p_buf, indices), _gather_rows(topk_index_buf, indices),
            _gather_rows(output_tokens_buf, indices), _gather_rows(hidden_states_buf, indices))


def apply() -> None:
    """Register the hook; only when SGLang runs on CPU."""
    register_once(__name__, [(HOOKED_SYMBOLS[0], _around_gather, "AROUND")], cpu_only=True)
