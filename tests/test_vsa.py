"""VSA reference model, and the two index passes it motivates: fold_gathers and padded_buffer."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.models import get_config, wan_example_inputs
from diffopt.models.vsa import (
    VSAWanBlock,
    block_sparse_attention,
    non_pad_index,
    padded_len,
    reverse_tile_partition_indices,
    tile,
    tile_partition_indices,
    untile,
    vsa_config,
    vsa_indices,
)
from diffopt.testing import check_passes, count_ops, only, trace

INDEX = "aten.index.Tensor"
grids = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
OURS_OFF = {"passes": {"padded_buffer": False, "fold_gathers": False}}
VSA = ("fold_invariant", "padded_buffer", "fold_gathers")  # run through Inductor, checked against the same compile without them


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def constants(result, pass_name):
    """The compile-time constants the pass put in the graph (get_attr targets)."""
    return [n.target for n in result.after(pass_name).nodes if n.op == "get_attr" and n.target.startswith("_diffopt_")]


# --- the reference model ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(grid=grids, batch=st.integers(1, 2))
def test_tile_untile_round_trip(grid, batch):
    idx = vsa_indices(grid)
    S, P = math.prod(grid), padded_len(grid)
    assert int(idx["variable_block_sizes"].sum()) == S and P % 64 == 0 and P >= S
    x = rand(batch, S, 3, 4, seed=sum(grid))
    tiled = tile(x, idx["tile_partition_indices"], idx["non_pad_index"], P)
    assert torch.equal(untile(tiled, idx["reverse_tile_partition_indices"], idx["non_pad_index"]), x)
    pad = torch.ones(P, dtype=torch.bool)
    pad[idx["non_pad_index"]] = False
    assert torch.count_nonzero(tiled[:, pad]) == 0
    # Tile i holds its real tokens first: rows [64 i, 64 i + size_i).
    sizes = idx["variable_block_sizes"]
    first_rows = (torch.arange(P) % 64) < sizes.repeat_interleave(64)
    assert torch.equal(~pad, first_rows)


def test_dense_topk_is_full_attention():
    grid = (5, 6, 7)
    idx = vsa_indices(grid)
    S, P = math.prod(grid), padded_len(grid)
    q, k, v = (rand(2, S, 3, 8, seed=s) for s in range(3))
    tiled = [tile(t, idx["tile_partition_indices"], idx["non_pad_index"], P) for t in (q, k, v)]
    out = block_sparse_attention(*tiled, idx["variable_block_sizes"], topk=P // 64)
    out = untile(out, idx["reverse_tile_partition_indices"], idx["non_pad_index"])
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref)


# --- fold_gathers -------------------------------------------------------------------


def untile_per_call(x, grid):
    npi = non_pad_index(grid, device=x.device)
    return untile(x, reverse_tile_partition_indices(grid, device=x.device), npi)


@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 6, 7), (1, 3, 9)])
@torch.no_grad()
def test_untile_per_call_folds_to_one_constant_gather(grid):
    x = rand(2, padded_len(grid), 3, 4)
    result = check_passes(untile_per_call, x, grid, passes=VSA)
    assert result.report.matches("fold_gathers") == 1
    assert count_ops(result.before("fold_gathers"))[INDEX] == 2
    assert count_ops(result.after("fold_gathers"))[INDEX] == 1
    # The index build (arange/slices/cat/argsort) is gone: the composed index is a constant.
    after = count_ops(result.after("fold_gathers"))
    assert after["aten.cat.default"] == 0 and after["aten.sort.default"] == 0
    [name] = constants(result, "fold_gathers")
    torch.testing.assert_close(result.output, untile_per_call(x, grid), rtol=0, atol=0)
    gm = result.after("fold_gathers").owning_module
    assert torch.equal(getattr(gm, name), non_pad_index(grid)[reverse_tile_partition_indices(grid)])


@settings(max_examples=6, deadline=None)
@given(grid=grids)
@torch.no_grad()
def test_composed_index_equals_two_step_gather(grid):
    npi, ridx = non_pad_index(grid), reverse_tile_partition_indices(grid)
    x = rand(1, padded_len(grid), 2, 3, seed=sum(grid))
    assert torch.equal(x[:, npi][:, ridx], x[:, npi[ridx]])
    result = check_passes(untile_per_call, x, grid, passes=VSA)
    [name] = constants(result, "fold_gathers")
    assert torch.equal(getattr(result.after("fold_gathers").owning_module, name), npi[ridx])
    assert torch.equal(result.output, x[:, npi][:, ridx])


def flatten_of_a_slice_with_a_size_one_dim(x):
    return x[0:2, 0:1, 0:4].flatten() * 2


@torch.no_grad()
def test_split_contiguous_keeps_the_copy_before_an_impossible_view():
    # Not a VSA pass: the stock VSA index build (tile_partition_indices, per call) hits it on
    # grids whose height is 1 mod 4, e.g. (8, 5, 8), or Wan 720p's (21, 45, 80) token grid.
    x = torch.arange(10.0).view(2, 1, 5)
    result = trace(flatten_of_a_slice_with_a_size_one_dim, x)
    torch.testing.assert_close(result.output, flatten_of_a_slice_with_a_size_one_dim(x))


def two_gathers(x, a, b):
    return x[:, a][:, b] * 2


@torch.no_grad()
def test_index_that_changes_per_call_is_composed_in_the_graph_not_cached():
    # a and b are graph inputs: their values may change on every call, so the composed
    # index must not become a compile-time constant; it is a[b], computed in the graph.
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return diffopt.diffopt_backend(gm, example_inputs, options={"inductor": False, "strict": True})

    x = rand(2, 20, 3)
    result = check_passes(two_gathers, x, torch.randperm(20)[:12], torch.randint(-12, 12, (7,)), passes=VSA)
    assert result.report.matches("fold_gathers") == 1 and constants(result, "fold_gathers") == []
    assert count_ops(result.after("fold_gathers"))[INDEX] == 2  # a[b] (ints) and x[:, a[b]]

    torch._dynamo.reset()
    compiled = torch.compile(two_gathers, backend=backend, fullgraph=True, dynamic=False)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randperm(20, generator=g)[:12] - 10, torch.randint(-12, 12, (7,), generator=g)  # negatives wrap
        x = rand(2, 20, 3, seed=seed)
        assert torch.equal(compiled(x, a, b), two_gathers(x, a, b))
    assert len(compiles) == 1


def random_index_gathers(x):
    a = torch.randperm(x.shape[1], device=x.device)
    b = torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
    return x[:, a][:, b]


@torch.no_grad()
def test_random_index_is_not_folded_into_a_constant():
    x = rand(2, 16, 3)
    torch.manual_seed(7)
    result = trace(random_index_gathers, x, options=only(*VSA))  # random: no second compile to compare with
    torch.manual_seed(7)
    expected = random_index_gathers(x)
    assert result.report.matches("fold_gathers") == 1 and constants(result, "fold_gathers") == []
    assert count_ops(result.after("fold_gathers"))["aten.randperm.default"] == 1
    torch.testing.assert_close(result.output, expected, rtol=0, atol=0)


def other_dims(x, a, b):
    return x[:, a][:, :, b]


def index_2d(x, a, b):
    return x[:, a.view(3, 4)][:, b % 3]


def reused(x, a, b):
    y = x[:, a]
    return y[:, b] + y.sum()


@pytest.mark.parametrize("fn", [other_dims, index_2d, reused])
@torch.no_grad()
def test_fold_near_misses(fn):
    x, a, b = rand(2, 12, 12), torch.randperm(12), torch.randint(0, 12, (5,))
    result = check_passes(fn, x, a, b, passes=VSA)
    assert result.report.matches("fold_gathers") == 0
    torch.testing.assert_close(result.output, fn(x, a, b))  # bit for bit against the compile without the passes


def select_forms(x, a, b):
    by_select = torch.index_select(torch.index_select(x, 1, a), 1, b)
    g1 = torch.gather(x, 1, a.view(1, -1, 1).expand(x.shape[0], -1, x.shape[2]))
    by_gather = torch.gather(g1, 1, b.view(1, -1, 1).expand(x.shape[0], -1, x.shape[2]))
    chain = x[:, a][:, b][:, b.flip(0) % 6]
    return by_select, by_gather, chain


@torch.no_grad()
def test_fold_index_select_gather_and_chains():
    x, a, b = rand(2, 10, 3), torch.randperm(10)[:8].to(torch.int32), torch.randint(0, 8, (6,))
    # dedupe off: it would share the x[:, a] that by_select and chain both gather, leaving less to fold
    result = trace(select_forms, x, a.long(), b, options={"passes": {"dedupe": False}})
    assert result.report.matches("fold_gathers") == 4  # select pair, gather pair, chain of three (2 folds)
    for got, want in zip(result.output, select_forms(x, a.long(), b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x_idx = trace(two_gathers, x, a, b.to(torch.int32))  # int32 indices
    torch.testing.assert_close(x_idx.output, two_gathers(x, a, b.to(torch.int32)), rtol=0, atol=0)
    assert x_idx.report.matches("fold_gathers") == 1


# --- padded_buffer ------------------------------------------------------------------


GRID = (5, 6, 7)


def tile_per_call(x):
    return tile(x, tile_partition_indices(GRID, device=x.device), non_pad_index(GRID, device=x.device), padded_len(GRID))


def tile_inputs(x, tidx, npi):
    return tile(x, tidx, npi, padded_len(GRID))


def _check_tiles(fn, calls, *index_args, per_call_indices=None):
    S, P = math.prod(GRID), padded_len(GRID)
    for seed in range(calls):
        x = rand(2, S, 3, 4, seed=seed) + 1.0  # no zero rows by accident
        args = index_args if per_call_indices is None else per_call_indices(seed)
        out = fn(x, *args)
        tidx, npi = (args if args else (tile_partition_indices(GRID), non_pad_index(GRID)))
        pad = torch.ones(P, dtype=torch.bool)
        pad[npi] = False
        assert torch.count_nonzero(out[:, pad]) == 0
        assert torch.equal(out, tile(x, tidx, npi, P))


@torch.no_grad()
def test_tile_per_call_becomes_one_gather_with_constant_index():
    x = rand(2, math.prod(GRID), 3, 4)
    result = check_passes(tile_per_call, x, passes=VSA)
    assert result.report.matches("padded_buffer") == 1 and result.report.matches("fold_gathers") == 1
    after = count_ops(result.after("fold_gathers"))
    assert after["aten.full.default"] == 0 and after["aten.index_put.default"] == 0  # no zero fill, no scatter
    assert after[INDEX] == 1 and after["aten.cat.default"] == 0
    assert len(constants(result, "fold_gathers")) == 2  # composed source index, pad mask


@torch.no_grad()
def test_pad_rows_stay_zero_over_many_calls(inductor):
    compiled = torch.compile(
        lambda x: tile_per_call(x),
        backend=lambda gm, ex: diffopt.diffopt_backend(gm, ex, options={"inductor": inductor, "strict": True}),
        fullgraph=True,
    )
    _check_tiles(compiled, 20)


@torch.no_grad()
def test_scatter_index_that_changes_per_call_stays_in_the_graph():
    S, P = math.prod(GRID), padded_len(GRID)
    tidx, npi = tile_partition_indices(GRID), non_pad_index(GRID)
    result = check_passes(tile_inputs, rand(2, S, 3, 4), tidx, npi, passes=VSA)
    assert result.report.matches("padded_buffer") == 1 and constants(result, "padded_buffer") == []
    assert count_ops(result.after("padded_buffer"))["aten.index_put.default"] == 1  # the small inverse map, per call

    def other_indices(seed):  # a different permutation and different rows each call
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(S, generator=g), torch.randperm(P, generator=g)[:S].sort().values - P * (seed % 2)

    compiled = torch.compile(
        tile_inputs,
        backend=lambda gm, ex: diffopt.diffopt_backend(gm, ex, options={"inductor": False, "strict": True}),
        fullgraph=True,
        dynamic=False,
    )
    _check_tiles(compiled, 8, per_call_indices=other_indices)


def filled_ones(x, npi):
    buf = torch.ones(x.shape[0], 64, x.shape[2])
    buf[:, npi] = x
    return buf


def accumulated(x, npi):
    buf = torch.zeros(64, x.shape[2])
    buf.index_put_((npi,), x[0], accumulate=True)
    return buf


def broadcast_value(x, npi):
    buf = torch.zeros(x.shape[0], 64, x.shape[2])
    buf[:, npi] = x[:, :1]
    return buf


def zeros_used_after(x, npi):
    buf = torch.zeros(x.shape[0], 64, x.shape[2])
    buf[:, npi] = x
    buf[:, :2] = 1.0
    return buf


@pytest.mark.parametrize("fn,fires", [(filled_ones, 0), (accumulated, 0), (broadcast_value, 0), (zeros_used_after, 1)])
@torch.no_grad()
def test_padded_buffer_near_misses(fn, fires):
    x, npi = rand(2, 10, 3), torch.randperm(64)[:10]
    result = check_passes(fn, x, npi, passes=VSA)
    assert result.report.matches("padded_buffer") == fires
    torch.testing.assert_close(result.output, fn(x, npi), rtol=0, atol=0)


@torch.no_grad()
def test_dynamic_batch():
    result = check_passes(tile_per_call, rand(3, math.prod(GRID), 3, 4), passes=VSA, dynamic=True)
    assert result.report.matches("padded_buffer") == 1 and result.report.matches("fold_gathers") == 1
    torch.testing.assert_close(result.output, tile_per_call(rand(3, math.prod(GRID), 3, 4)), rtol=0, atol=0)


# --- the VSA block, compiled ----------------------------------------------------------


def vsa_block(dtype, index_form, topk=3, grid=(5, 6, 7)):
    config = vsa_config(get_config("wan-tiny"), grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = VSAWanBlock(config, topk=topk, index_form=index_form).eval().to(dtype)
    return block, wan_example_inputs(config, dtype=dtype)


@pytest.mark.parametrize("index_form", ["buffers", "per_call"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_vsa_block_rewrites_match_eager(dtype, index_form):
    block, inputs = vsa_block(dtype, index_form)
    result = trace(block, *inputs)
    assert result.report.matches("padded_buffer") == 3  # tile(q), tile(k), tile(v)
    assert result.report.matches("fold_gathers") == 4  # the three tiles' gathers, untile
    assert not result.report.failures()
    # The rewrites are exact: same graph without them gives the same bits.
    without = trace(block, *inputs, options=OURS_OFF)
    assert torch.equal(result.output, without.output)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(result.output, block(*inputs), **tol)
    if index_form == "per_call":
        assert len(constants(result, "fold_gathers")) >= 3


@torch.no_grad()
def test_vsa_block_inductor_matches_eager():
    block, inputs = vsa_block(torch.float32, "per_call")
    report = diffopt.explain(block, *inputs, options={"strict": True})
    assert report.matches("padded_buffer") == 3 and report.matches("fold_gathers") == 4
    torch.testing.assert_close(report.output, block(*inputs), rtol=1e-5, atol=1e-5)
