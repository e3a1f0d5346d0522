"""The pure-torch ``sgl_kernel`` stand-ins: op semantics and when the import hook uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sglang_dsde.patches import sgl_kernel_standins as sk


def test_assign_req_to_token_pool_and_its_inverse():
    req_to_token = torch.zeros((3, 10), dtype=torch.int32)
    reqs = torch.tensor([2, 0])
    start, end = torch.tensor([1, 0]), torch.tensor([4, 2])
    locs = torch.tensor([11, 12, 13, 21, 22])
    sk.assign_req_to_token_pool_cpu(reqs, req_to_token, start, end, locs, 10)
    assert req_to_token[2, 1:4].tolist() == [11, 12, 13]
    assert req_to_token[0, 0:2].tolist() == [21, 22]
    out = torch.empty(5, dtype=torch.int64)
    sk.assign_extend_cache_locs_cpu(reqs, req_to_token, start, end, out, 10)
    assert out.tolist() == locs.tolist()


def test_assign_draft_cache_locs_contiguous():
    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10)
    out = torch.empty(2 * 3, dtype=torch.int64)
    sk.assign_draft_cache_locs_contiguous_cpu(torch.tensor([3, 1]), req_to_token,
                                              torch.tensor([5, 2]), out, 10, 1, 3)
    assert out.tolist() == [35, 36, 37, 12, 13, 14]


def test_fill_bonus_tokens_and_accept_out_cache_loc():
    accept_tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    bonus = torch.zeros(2, dtype=torch.int64)
    sk.fill_bonus_tokens_cpu(accept_tokens, torch.tensor([2, 3]), bonus, 3)
    assert bonus.tolist() == [6, 10]
    accept_index = torch.tensor([[0, 1, -1], [5, -1, -1]])
    out = torch.full((4,), -7)
    sk.fill_accept_out_cache_loc_cpu(accept_index, torch.arange(100, 110), out)
    assert out.tolist() == [100, 101, 105, -7]


def _chain_tree(bs, n, seq_lens):
    """What EAGLE's topk-1 draft passes to tree building: a chain of n - 1 drafts."""
    parent_list = torch.arange(-1, n - 2).repeat(bs, 1)  # unused for topk 1 beyond index 0
    selected = torch.arange(n - 1).repeat(bs, 1)
    tree_mask = torch.ones(bs * n * n, dtype=torch.bool)
    positions = torch.empty(bs * n, dtype=torch.int64)
    idx = torch.empty((bs, n), dtype=torch.int64)
    nxt = torch.full((bs, n), -1, dtype=torch.int64)
    sib = torch.full((bs, n), -1, dtype=torch.int64)
    sk.build_tree_kernel_efficient_cpu(parent_list, selected, torch.tensor(seq_lens), tree_mask,
                                       positions, idx, nxt, sib, 1, n - 1, n, 1)
    return tree_mask.view(bs, n, n), positions.view(bs, n), idx, nxt, sib


def test_build_tree_for_a_chain_is_causal_and_linked():
    mask, positions, idx, nxt, sib = _chain_tree(2, 5, [7, 3])
    assert torch.equal(mask[0], torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    assert positions.tolist() == [[7, 8, 9, 10, 11], [3, 4, 5, 6, 7]]
    assert idx.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert nxt.tolist() == [[1, 2, 3, 4, -1]] * 2
    assert (sib == -1).all()


def test_build_tree_with_two_branches():
    # topk 2, depth 2: root -> tokens 0,1 (step 0); token 0 -> tokens 2,3 (step 1).
    n = 4
    parent_list = torch.tensor([[-1, 0, 1]])  # step-1 parents: selected-index 0 and 1
    selected = torch.tensor([[0, 1, 2]])  # nodes 1,2 = first step; node 3 = child of 0
    tree_mask = torch.ones(n * n, dtype=torch.bool)
    positions = torch.empty(n, dtype=torch.int64)
    idx = torch.empty((1, n), dtype=torch.int64)
    nxt = torch.full((1, n), -1, dtype=torch.int64)
    sib = torch.full((1, n), -1, dtype=torch.int64)
    sk.build_tree_kernel_efficient_cpu(parent_list, selected, torch.tensor([10]), tree_mask,
                                       positions, idx, nxt, sib, 2, 2, n, 1)
    m = tree_mask.view(n, n).int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert positions.tolist() == [10, 11, 11, 12]
    assert nxt[0].tolist() == [1, 3, -1, -1]  # root's first child is node 1
    assert sib[0].tolist() == [-1, 2, -1, -1]  # node 1's sibling is node 2


@pytest.mark.parametrize("target,accepted", [([3, 4, 9, 9, 9], 2), ([3, 4, 5, 6, 8], 4),
                                             ([1, 9, 9, 9, 9], 0)])
def test_verify_tree_greedy_on_a_chain(target, accepted):
    _, _, idx, nxt, sib = _chain_tree(1, 5, [4])
    candidates = torch.tensor([[2, 3, 4, 5, 6]])  # node 0 = bonus token, then 4 drafts
    predicts = torch.full((5,), -1, dtype=torch.int64)
    accept_index = torch.full((1, 5), -1, dtype=torch.int64)
    accept_num = torch.zeros(1, dtype=torch.int64)
    sk.verify_tree_greedy_cpu(predicts, accept_index, accept_num, candidates, idx, nxt, sib,
                              torch.tensor(target))
    assert accept_num.tolist() == [accepted]
    assert accept_index[0, :accepted + 1].tolist() == list(range(accepted + 1))
    assert (accept_index[0, accepted + 1:] == -1).all()
    assert predicts[:accepted + 1].tolist() == target[:accepted + 1]


def test_build_draft_decode_metadata():
    req_to_token = torch.arange(60, dtype=torch.int32).view(2, 30)
    table = sk.build_draft_decode_metadata_cpu(req_to_token, torch.tensor([1]),
                                               torch.tensor([4]), 2, 3, 30)
    assert table[0, :7].tolist() == [30, 31, 32, 33, 34, 35, 36]
    assert table[1, :7].tolist() == [30, 31, 32, 33, 37, 38, 39]


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer():
    bufs = [torch.arange(12, dtype=torch.float32).view(6, 2).clone() for _ in range(2)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs])
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
    sk.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([0, 5]), torch.tensor([2, 1]))
    for b in bufs:
        assert b[0].tolist() == [4.0, 5.0] and b[5].tolist() == [2.0, 3.0]


def test_unsupported_names_raise_clearly():
    with pytest.raises(NotImplementedError, match="rotate_input_ids_cpu"):
        sk.STANDIN_OPS["rotate_input_ids_cpu"]()


def _import_in_child(tmp_path, fake_package_source=None, env_value="1"):
    """``import sgl_kernel`` in a fresh interpreter (hook installed as the .pth does)."""
    if fake_package_source is not None:
        pkg = tmp_path / "sgl_kernel"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(textwrap.dedent(fake_package_source))
    code = textwrap.dedent("""
        import json, sys
        from sglang_dsde.patches import sgl_kernel_standins as sk
        sk.install()
        try:
            import sgl_kernel
        except ImportError as exc:
            print(json.dumps({"error": type(exc).__name__})); sys.exit(0)
        print(json.dumps({"standin": sk.is_standin(sgl_kernel),
                          "real_attr": getattr(sgl_kernel, "REAL", None),
                          "has_op": hasattr(sgl_kernel, "verify_tree_greedy_cpu"),
                          "own_op": getattr(sgl_kernel, "assign_req_to_token_pool_cpu",
                                            None) is not sk.assign_req_to_token_pool_cpu}))
    """)
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE=env_value,
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hook_gives_standins_when_sgl_kernel_is_absent(tmp_path):
    got = _import_in_child(tmp_path)
    assert got["standin"] and got["has_op"]


def test_hook_gives_standins_when_the_real_package_cannot_load(tmp_path):
    got = _import_in_child(tmp_path, "raise OSError('libcuda.so.1: cannot open shared object')")
    assert got["standin"] and got["has_op"]


def test_hook_keeps_a_working_real_package_and_only_fills_missing_names(tmp_path):
    got = _import_in_child(tmp_path, """
        REAL = True
        def assign_req_to_token_pool_cpu(*args):
            pass
    """)
    assert got == {"standin": False, "real_attr": True, "has_op": True, "own_op": True}


def test_hook_is_inert_without_the_cpu_engine_flag(tmp_path):
    assert _import_in_child(tmp_path, env_value="0") == {"error": "ModuleNotFoundError"}
