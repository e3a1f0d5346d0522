"""Pure-torch stand-ins for the ``sgl_kernel`` CPU ops SGLang uses on its CPU path.

Read against SGLang 0.5.23. With ``SGLANG_USE_CPU_ENGINE=1`` SGLang binds CPU kernels
from ``sgl_kernel`` at *module import time* (``from sgl_kernel import
assign_req_to_token_pool_cpu`` in ``srt/mem_cache/allocation.py``, the speculative
cache-location / bonus-token / tree ops in ``kernels/ops/speculative/*``, ...). Those
kernels exist only in SGLang's source-built CPU ``sgl_kernel``; PyPI's ``sglang-kernel`` is
CUDA-only and fails to import without ``libcuda``. This module provides the same names,
written with torch (semantics read from the Python callers and the CUDA/Triton kernels
they replace), so the stock CPU speculative path runs.

When do the stand-ins win?
    Only when the real CPU kernels are absent. On ``import sgl_kernel`` the finder below
    first tries the real package through the normal import system; if it imports and
    has a name, the real one is used. If it is not installed, or raises while loading (the
    CUDA build on a GPU-less machine), the import is cleaned up and a stand-in module is
    returned instead; a real package that loads but lacks some CPU names (a CUDA build)
    gets only the missing names added.

How do they become importable early enough?
    SGLang's scheduler processes are *spawned*: the child unpickles its target
    (``sglang.srt.managers.scheduler.run_scheduler_process``), which imports the scheduler
    module and with it every module that runs ``from sgl_kernel import ...``, all before
    ``load_plugins()`` (the first statement of that function) can run the plugin. A plugin
    hook is too late there. So the finder is installed at interpreter start-up: the
    package's one-line ``sglang_dsde-early.pth`` (put at the root of site-packages by
    ``setup.py``; Python's ``site`` runs it in every process of the environment) imports
    ``sglang_dsde.patches.early``, whose ``_install()`` calls :func:`install`. That does
    nothing unless ``SGLANG_USE_CPU_ENGINE=1``, and then only puts a lazy
    ``sys.meta_path`` finder first (no torch, no SGLang import; the stand-in module is
    built on the first ``import sgl_kernel``). The plugin's ``apply()`` calls
    :func:`install` again (idempotent) for a process that somehow skipped the ``.pth``.

Ops that SGLang only *imports* on paths this project does not serve (multi-layer EAGLE's
``rotate_input_ids_cpu``) raise ``NotImplementedError`` naming the op when called.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types

SGLANG_VERSION_READ = "0.5.23"

#: The SGLang callers whose CPU branch calls the stand-in ops (resolved by
#: tests/integration/test_patch_symbols.py).
HOOKED_SYMBOLS = (
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
    "sglang.kernels.ops.kvcache.cache_move.copy_all_layer_kv_cache_func",
    "sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func",
    "sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func",
    "sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func",
    "sglang.kernels.ops.speculative.cache_locs.assign_extend_cache_locs_func",
    "sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func",
    "sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func",
    "sglang.srt.utils.common.is_cpu",
)

#: Modules whose ``from sgl_kernel import ...`` statements (module-level ``if _is_cpu:``
#: blocks and function bodies) must be fully covered by :data:`STANDIN_NAMES` (checked by
#: tests/integration/test_sgl_kernel_coverage.py against the installed SGLang).
IMPORTING_MODULES = (
    "sglang.srt.mem_cache.allocation",
    "sglang.kernels.ops.kvcache.cache_move",
    "sglang.kernels.ops.speculative.eagle",
    "sglang.kernels.ops.speculative.cache_locs",
    "sglang.kernels.ops.speculative.spec_tree",
    "sglang.kernels.ops.speculative.multi_layer_eagle",
    "sglang.srt.layers.attention.intel_amx_backend",
)

_ENV = "SGLANG_USE_CPU_ENGINE"
_MODULE = "sgl_kernel"


def cpu_engine_requested() -> bool:
    """The condition SGLang's own ``is_cpu()`` starts from."""
    return os.environ.get(_ENV, "0") == "1"


# ---------------------------------------------------------------------------------------
# The ops. Argument order follows SGLang's call sites exactly; "mutable" outputs are
# written in place, as the kernels do.
# ---------------------------------------------------------------------------------------


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """``req_to_token[req_i, start_i:end_i] = out_cache_loc[packed slice of request i]``."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    pos = 0
    for req, s, e in zip(req_pool_indices.tolist(), starts, ends):
        n = e - s
        if n > 0:
            req_to_token[req, s:e] = out_cache_loc[pos:pos + n].to(req_to_token.dtype)
        pos += n


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """The inverse gather: ``out_cache_loc[packed slice i] = req_to_token[req_i, start_i:end_i]``."""
    pos = 0
    for req, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = e - s
        if n > 0:
            out_cache_loc[pos:pos + n] = req_to_token[req, s:e].to(out_cache_loc.dtype)
        pos += n


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens,
                                           out_cache_loc, pool_len, topk, num_cols):
    """Request i's ``topk * num_cols`` slots from ``seq_lens[i]`` on, packed per request."""
    width = topk * num_cols
    for i, (req, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * width:(i + 1) * width] = req_to_token[req, s:s + width].to(
            out_cache_loc.dtype)


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride):
    """``bonus[i] = accept_tokens.flat[i * stride + accept_lens[i] - 1]`` (the last accepted)."""
    bs = accept_lens.shape[0]
    import torch

    idx = torch.arange(bs, device=accept_lens.device) * accept_stride + accept_lens.long() - 1
    bonus_tokens[:bs] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """Compact the cache slots of accepted nodes (``accept_index != -1``), keeping order."""
    flat = accept_index.reshape(-1)
    keep = flat[flat != -1].long()
    accept_out_cache_loc[:keep.numel()] = out_cache_loc[keep].to(accept_out_cache_loc.dtype)


def build_draft_decode_metadata_cpu(req_to_token, req_pool_indices, seq_lens, topk,
                                    num_steps, pool_len):
    """One ``req_to_token`` row per (request, branch): the prefix, then the branch's draft
    slots at ``seq_len + branch * num_steps + step`` (the intel_amx draft-decode layout)."""
    import torch

    bs = req_pool_indices.shape[0]
    out = torch.zeros((bs * topk, pool_len), dtype=req_to_token.dtype,
                      device=req_to_token.device)
    for i, (req, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        for t in range(topk):
            row = out[i * topk + t]
            row[:s] = req_to_token[req, :s]
            row[s:s + num_steps] = req_to_token[req, s + t * num_steps:s + (t + 1) * num_steps]
    return out


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every KV buffer (base address ``data_ptrs[j]``, row size ``strides[j]`` bytes) copy
    row ``src_loc[i]`` onto row ``tgt_loc[i]``; the buffers are raw addresses, so ctypes."""
    import ctypes

    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            if tgt != src:
                ctypes.memmove(base + tgt * stride, base + src * stride, stride)


_FULL_MASK, _QLEN_ONLY, _QLEN_ONLY_BITPACKING = 0, 1, 2


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask,
                                    positions, retrive_index, retrive_next_token,
                                    retrive_next_sibling, topk, depth, draft_token_num,
                                    tree_mask_mode):
    """EAGLE's draft-tree construction (``build_tree_efficient`` in SGLang's eagle.cuh).

    For every request: node 0 is the verified (bonus) token; node ``i > 0`` is the draft
    token ``selected_index[i - 1]`` whose parent is found through ``parent_list``. Writes
    the attention mask rows, the positions, and the first-child / next-sibling links.
    """
    mode = int(tree_mask_mode)
    if mode == _QLEN_ONLY_BITPACKING:
        raise NotImplementedError("sgl_kernel stand-in: bit-packed tree masks (topk > 1 with "
                                  "QLEN_ONLY_BITPACKING) are not implemented")
    n = draft_token_num
    bs = verified_seq_len.shape[0]
    seq_lens = verified_seq_len.tolist()
    parents = parent_list.reshape(bs, -1).tolist()
    selected = selected_index.reshape(bs, -1).tolist()
    mask = tree_mask.view(-1)
    next_token = retrive_next_token.view(bs, n)
    next_sibling = retrive_next_sibling.view(bs, n)
    seq_tree_idx = 0
    for b in range(bs):
        seq_len = seq_lens[b]
        sel = selected[b]

        def node_of(token_idx):  # the node (1-based) whose selected index is token_idx
            for pos in range(n - 1):
                if sel[pos] == token_idx:
                    return pos + 1
            return None

        for tid in range(n):
            if mode == _FULL_MASK:
                row = seq_tree_idx + (seq_len + n) * tid + seq_len
            else:
                row = n * n * b + n * tid
            mask[row] = True
            mask[row + 1:row + n] = False
        # Links, from the last node backwards (as the kernel does).
        for i in range(n - 1, 0, -1):
            retrive_index[b, i] = b * n + i
            parent_tb = sel[i - 1] // topk
            parent_node = 0
            if parent_tb > 0:
                parent_node = node_of(parents[b][parent_tb])
                if parent_node is None:
                    continue  # invalid tree: the kernel warns and skips the token
            first = int(next_token[b, parent_node])
            next_token[b, parent_node] = i
            if first != -1:
                next_sibling[b, i] = first
        retrive_index[b, 0] = b * n
        positions[b * n] = seq_len
        # Mask rows and positions: walk each node up to the root.
        for tid in range(1, n):
            if mode == _FULL_MASK:
                row = seq_tree_idx + (seq_len + n) * tid + seq_len + 1
            else:
                row = n * n * b + n * tid + 1
            cur, depth_of = tid - 1, 0
            while True:
                depth_of += 1
                mask[row + cur] = True
                parent_tb = sel[cur] // topk
                if parent_tb == 0:
                    break
                node = node_of(parents[b][parent_tb])
                cur = (node - 1) if node is not None else n - 1
            positions[b * n + tid] = depth_of + seq_len
        seq_tree_idx += n * n + seq_len * n


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates,
                           retrive_index, retrive_next_token, retrive_next_sibling,
                           target_predict):
    """Greedy tree verification (``VerifyTreeGreedy`` in SGLang's eagle.cuh): walk from the
    root, at each depth accept the first child whose draft token equals the target's
    argmax after the last accepted node. ``accept_token_num`` counts accepted drafts."""
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    cand = candidates.tolist()
    r_index = retrive_index.tolist()
    r_next = retrive_next_token.tolist()
    r_sib = retrive_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    for b in range(bs):
        last = r_index[b][0]
        accept_index[b, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, num_spec):
            cur = r_next[b][cur]
            while cur != -1:
                if cand[b][cur] == target[last]:
                    predicts[last] = target[last]
                    accepted += 1
                    accept_index[b, accepted] = r_index[b][cur]
                    last = r_index[b][cur]
                    break
                cur = r_sib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        predicts[last] = target[last]
    return predicts, accept_index, accept_token_num


def _not_implemented(name):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no pure-torch stand-in in sglang-dsde (the path that "
            f"calls it is not supported on CPU without SGLang's CPU kernels)")

    op.__name__ = name
    return op


#: Every name the stand-in ``sgl_kernel`` module exports.
STANDIN_OPS = {
    f.__name__: f
    for f in (
        assign_req_to_token_pool_cpu,
        assign_extend_cache_locs_cpu,
        assign_draft_cache_locs_contiguous_cpu,
        fill_bonus_tokens_cpu,
        fill_accept_out_cache_loc_cpu,
        build_draft_decode_metadata_cpu,
        copy_all_layer_kv_cache_cpu,
        build_tree_kernel_efficient_cpu,
        verify_tree_greedy_cpu,
        _not_implemented("rotate_input_ids_cpu"),
    )
}
STANDIN_NAMES = frozenset(STANDIN_OPS)


# ---------------------------------------------------------------------------------------
# The import hook.
# ---------------------------------------------------------------------------------------


def make_standin_module() -> types.ModuleType:
    module = types.ModuleType(_MODULE, "sglang-dsde pure-torch stand-in for sgl_kernel (CPU)")
    module.__dict__.update(STANDIN_OPS)
    module.__path__ = []  # a package with no submodules
    module.__sglang_dsde_standin__ = True
    return module


def is_standin(module) -> bool:
    return bool(getattr(module, "__sglang_dsde_standin__", False))


class _Loader(importlib.abc.Loader):
    def __init__(self, finder: "StandinFinder"):
        self._finder = finder

    def create_module(self, spec):
        real = self._finder.import_real()
        if real is None:
            return make_standin_module()
        missing = [name for name in STANDIN_OPS if not hasattr(real, name)]
        for name in missing:  # e.g. a CUDA build: add only what it lacks
            setattr(real, name, STANDIN_OPS[name])
        return real

    def exec_module(self, module):
        pass


class StandinFinder(importlib.abc.MetaPathFinder):
    """Answers ``import sgl_kernel`` with the real package when it loads, else stand-ins."""

    def __init__(self):
        self._busy = threading.local()
        self.last_error: BaseException | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _MODULE or getattr(self._busy, "on", False):
            return None
        return importlib.machinery.ModuleSpec(_MODULE, _Loader(self), is_package=True)

    def import_real(self):
        """Import the real ``sgl_kernel`` through the other finders; None if it fails."""
        self._busy.on = True
        saved = sys.modules.pop(_MODULE, None)
        try:
            return importlib.import_module(_MODULE)
        except Exception as exc:  # ImportError, or OSError from a CUDA .so without libcuda
            self.last_error = exc
            for name in [n for n in sys.modules if n == _MODULE or n.startswith(_MODULE + ".")]:
                sys.modules.pop(name, None)
            return None
        finally:
            self._busy.on = False
            if saved is not None:
                sys.modules.setdefault(_MODULE, saved)


def installed_finder() -> StandinFinder | None:
    for finder in sys.meta_path:
        if isinstance(finder, StandinFinder) or type(finder).__name__ == "StandinFinder":
            return finder
    return None


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` (only when ``SGLANG_USE_CPU_ENGINE=1``).

    Idempotent; returns whether a finder is installed. Cheap: imports nothing heavy.
    """
    if not cpu_engine_requested():
        return False
    if installed_finder() is None:
        sys.meta_path.insert(0, StandinFinder())
    return True


def apply() -> None:
    """Touch-point entry: install the finder (the ``.pth`` file normally did already)."""
    install()
