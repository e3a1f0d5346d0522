"""A CPU attention backend for SGLang's speculative path (draft decode, draft extend, verify).

Read against SGLang 0.5.23. On CPU without SGLang's source-built kernels the attention
backend resolves to ``torch_native`` (``--attention-backend intel_amx``, the CPU default,
falls back to it when ``has_amx`` is false: ``srt/arg_groups/overrides.py``), and
``TorchNativeAttnBackend`` (``layers/attention/torch_native_backend.py``) serves only
plain extend and decode: no ``TARGET_VERIFY`` (its extend reads ``extend_prefix_lens``,
which a verify batch does not carry), and the draft-backend factory
(``speculative/draft_utils.py``) has no ``torch_native`` entry for the multi-step draft
decode or the draft extend.

This touch-point adds exactly that, through SGLang's own extension points:

* :class:`SpecTorchNativeAttnBackend` subclasses ``TorchNativeAttnBackend``. Plain
  ``EXTEND`` / ``DECODE`` / ``MIXED`` forwards go to the parent unchanged (a server
  without speculation computes bit for bit what stock SGLang computes). The speculative
  modes use one compact routine, :func:`_attend`: write the new K/V at
  ``out_cache_loc``, then each request's queries attend over its ``req_to_token`` row:

  - ``TARGET_VERIFY``: ``num_draft_tokens`` queries after the committed prefix
    (``seq_lens``); causal for a chain (topk 1), the verify tree mask otherwise; with
    SGLang's ``RaggedVerifyLayout`` on the spec input (a ragged verify), each request's
    own ``verify_lens`` queries.
  - ``DRAFT_EXTEND_V2``: ``extend_seq_lens`` queries ending at
    ``seq_lens`` (the forward batch already carries the post-write length), causal.
  - ``DECODE`` inside the draft loop: one query per (request, branch) over a table set by
    the multi-step wrapper below (prefix + this branch's draft slots).

* :class:`SpecTorchNativeMultiStepDraftBackend` holds one backend per draft step
  (``num_steps - 1``; the first draft token comes from the draft extend) and, once per
  round, gives step ``s`` the view "prefix + ``s + 1`` draft tokens", like
  ``IntelAMXMultiStepDraftBackend`` does with its C++ kernels.

* Registration: ``register_attention_backend("torch_native")`` swaps the registry entry
  for the subclass, and an AROUND hook on ``DraftBackendFactory._create_backend`` adds a
  ``torch_native`` entry to the factory's backend maps (``stamps_children`` is how that
  method tells the multi-step container from the draft-extend backend). Applied only
  when SGLang runs on CPU (``is_cpu()``); inert elsewhere.

Correctness first: a per-request loop over ``scaled_dot_product_attention`` (float32
accumulation as in the parent). Not supported in the speculative modes (raise): the
sliding-window KV pool (``SWAKVPool``), cross attention and encoder models.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

import logging
from dataclasses import dataclass
from typing import List, Optional

SGLANG_VERSION_READ = "0.5.23"

HOOKED_SYMBOLS = (
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_decode",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.init_forward_metadata",
    "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory._create_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_target_verify",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_draft_extend_v2",
    "sglang.srt.speculative.spec_info.SpecInput.ragged_verify_layout",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
    "sglang.srt.utils.common.is_cpu",
)

BACKEND_NAME = "torch_native"
_FACTORY_TARGET = "sglang.srt.speculative.draft_utils.DraftBackendFactory._create_backend"

logger = logging.getLogger(__name__)


@dataclass
class _SpecView:
    """What the speculative modes attend over, per forward pass."""

    req_to_token: "object"  # [rows, pool_len] int table of KV slots
    row_indices: List[int]  # the table row of each request / branch
    kv_lens: List[int]  # keys visible to the last query of each row
    q_lens: List[int]  # queries of each row (consecutive in q)
    tree_mask: Optional["object"] = None  # [rows, n, n] bool among the last n keys


def _attend(q, k_cache, v_cache, view: _SpecView, *, scaling, num_kv_heads, out,
            sliding_window_size: int = -1):
    """Causal attention of each row's queries over its table row.

    q ``[tokens, heads, d]``; query i of a row with ``q_len`` queries and ``kv_len`` keys
    sits at position ``kv_len - q_len + i`` and sees keys ``<=`` its position (and, with a
    tree mask, only the draft keys the mask allows).
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    gqa = q.shape[1] != num_kv_heads
    start = 0
    for row, (table_row, kv_len, q_len) in enumerate(
            zip(view.row_indices, view.kv_lens, view.q_lens)):
        if q_len == 0:
            continue
        slots = view.req_to_token[table_row, :kv_len].long()
        key = k_cache[slots].transpose(0, 1)  # [kv_heads, kv_len, d]
        value = v_cache[slots].transpose(0, 1)
        query = q[start:start + q_len].transpose(0, 1)  # [heads, q_len, d]
        if key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        prefix = kv_len - q_len
        q_pos = torch.arange(prefix, kv_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(kv_len, device=q.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if view.tree_mask is not None:
            mask = mask.clone()
            mask[:, prefix:] = view.tree_mask[row]
        if sliding_window_size is not None and sliding_window_size > -1:
            mask &= k_pos >= q_pos - sliding_window_size
        out[start:start + q_len] = scaled_dot_product_attention(
            query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
            attn_mask=mask, scale=scaling, enable_gqa=gqa,
        ).squeeze(0).transpose(0, 1)
        start += q_len
    return out


def _backend_classes():
    """Build the classes lazily (SGLang is imported only when the backend is needed)."""
    global _classes
    if _classes is not None:
        return _classes

    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    class SpecTorchNativeAttnBackend(TorchNativeAttnBackend):
        """``torch_native`` plus TARGET_VERIFY, DRAFT_EXTEND and draft-loop decode."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            self.spec_view: Optional[_SpecView] = None
            # Set by the multi-step wrapper for the draft loop: (table, rows, kv_lens).
            self.draft_decode_view: Optional[_SpecView] = None

        # -- metadata ----------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            mode = forward_batch.forward_mode
            self.spec_view = None
            if mode.is_target_verify():
                self.spec_view = self._verify_view(forward_batch)
            elif mode.is_draft_extend_v2():
                lens = forward_batch.extend_seq_lens_cpu
                if lens is None:
                    lens = forward_batch.extend_seq_lens.tolist()
                self.spec_view = _SpecView(
                    self.req_to_token_pool.req_to_token,
                    forward_batch.req_pool_indices.tolist(),
                    forward_batch.seq_lens.tolist(),
                    [int(x) for x in lens],
                )
            if self.spec_view is not None and self.use_sliding_window_kv_pool:
                raise NotImplementedError(
                    "sglang-dsde CPU speculative attention: sliding-window KV pools")

        def _verify_view(self, forward_batch):
            spec_info = forward_batch.spec_info
            n = spec_info.draft_token_num
            bs = forward_batch.batch_size
            tree_mask = None
            if spec_info.topk != 1:
                mask = spec_info.custom_mask
                if mask is None or mask.numel() != bs * n * n:
                    raise NotImplementedError(
                        "sglang-dsde CPU verify: topk > 1 needs the QLEN_ONLY tree mask")
                tree_mask = mask.view(bs, n, n).to(torch.bool)
            layout = getattr(spec_info, "ragged_verify_layout", None)
            if layout is not None:  # a ragged verify: request b verifies its own width
                if tree_mask is not None:
                    raise NotImplementedError(
                        "sglang-dsde CPU verify: a ragged layout with a tree (topk > 1)")
                widths = [int(w) for w in layout.verify_lens_cpu]
                return _SpecView(
                    self.req_to_token_pool.req_to_token,
                    forward_batch.req_pool_indices.tolist(),
                    [s + w for s, w in zip(forward_batch.seq_lens.tolist(), widths)],
                    widths,
                )
            return _SpecView(
                self.req_to_token_pool.req_to_token,
                forward_batch.req_pool_indices.tolist(),
                (forward_batch.seq_lens + n).tolist(),
                [n] * bs,
                tree_mask,
            )

        # -- forwards ----------------------------------------------------------
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if self.spec_view is None:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            return self._forward_spec(q, k, v, layer, forward_batch, save_kv_cache,
                                      self.spec_view)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if self.draft_decode_view is None:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            return self._forward_spec(q, k, v, layer, forward_batch, save_kv_cache,
                                      self.draft_decode_view)

        def _forward_spec(self, q, k, v, layer, forward_batch, save_kv_cache, view):
            if layer.is_cross_attention or forward_batch.encoder_lens is not None:
                raise NotImplementedError(
                    "sglang-dsde CPU speculative attention: cross attention / encoders")
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc),
                    k, v)
            q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o = q.new_empty((q_.shape[0], layer.tp_q_head_num * layer.v_head_dim))
            _attend(
                q_,
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                view,
                scaling=layer.scaling,
                num_kv_heads=layer.tp_k_head_num,
                out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
                sliding_window_size=layer.sliding_window_size,
            )
            return o

    class SpecTorchNativeMultiStepDraftBackend:
        """One :class:`SpecTorchNativeAttnBackend` per draft step of the draft loop."""

        def __init__(self, model_runner, topk: int, speculative_num_steps: int):
            self.topk = topk
            self.speculative_num_steps = speculative_num_steps
            self.attn_backends = [SpecTorchNativeAttnBackend(model_runner)
                                  for _ in range(speculative_num_steps - 1)]
            self.req_to_token_pool = model_runner.req_to_token_pool

        def init_forward_metadata(self, forward_batch):
            topk, steps = self.topk, self.speculative_num_steps
            req_to_token = self.req_to_token_pool.req_to_token
            seq_lens = forward_batch.seq_lens.tolist()
            if topk == 1:
                # The chain's draft slots are the request's own next slots.
                table, rows = req_to_token, forward_batch.req_pool_indices.tolist()
            else:
                from sglang_dsde.patches.sgl_kernel_standins import (
                    build_draft_decode_metadata_cpu,
                )

                table = build_draft_decode_metadata_cpu(
                    req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                    topk, steps, req_to_token.shape[1])
                rows = list(range(len(seq_lens) * topk))
            per_row = [s for s in seq_lens for _ in range(topk)]
            for step, backend in enumerate(self.attn_backends):
                backend.init_forward_metadata(forward_batch)
                if backend.use_sliding_window_kv_pool:
                    raise NotImplementedError(
                        "sglang-dsde CPU speculative attention: sliding-window KV pools")
                backend.draft_decode_view = _SpecView(
                    table, rows, [s + step + 1 for s in per_row], [1] * len(rows))

    _classes = (SpecTorchNativeAttnBackend, SpecTorchNativeMultiStepDraftBackend)
    return _classes


_classes = None


def create_backend(model_runner):
    """The ``torch_native`` registry entry: the speculative-capable subclass."""
    return _backend_classes()[0](model_runner)


def _around_create_backend(original, factory, backend_name, backend_map, error_template,
                           stamps_children=False):
    """Give ``DraftBackendFactory`` a ``torch_native`` entry in both of its backend maps."""
    if BACKEND_NAME not in backend_map:
        backend_cls, multi_step_cls = _backend_classes()
        runner = factory.draft_model_runner
        if stamps_children:  # create_decode_backend: the multi-step container
            def make():
                return BACKEND_NAME, multi_step_cls(
                    runner, factory.topk, factory.speculative_num_steps)
        else:  # create_draft_extend_backend
            def make():
                return BACKEND_NAME, backend_cls(runner)
        backend_map = {**backend_map, BACKEND_NAME: make}
    return original(factory, backend_name, backend_map, error_template, stamps_children)


def apply() -> None:
    """Register the backend and the draft-factory hook; only when SGLang runs on CPU."""
    if register_once(__name__, [(_FACTORY_TARGET, _around_create_backend, "AROUND")],
                     cpu_only=True):
        from sglang.srt.layers.attention.attention_registry import register_attention_backend

        register_attention_backend(BACKEND_NAME)(create_backend)
