"""Units beyond final-position heads: positions named by slots, the residual stream, MLP neurons."""

from __future__ import annotations

import json

import pytest
import torch

from circuitfind.errors import CircuitfindError
from circuitfind.model.hooks import record_values
from circuitfind.model.space import ComponentSpace
from circuitfind.records.circuit import read_record
from circuitfind.records.circuit_source import read_circuit
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search

from conftest import compose

QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false", "checks=false")
PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]


def test_every_unit_kind_has_one_naming_scheme():
    heads = ComponentSpace(2, 3, 4, positions=("x", "last"))
    assert heads.shape == (2, 8) and heads.names()[:5] == ["L0.H0@x", "L0.H1@x", "L0.H2@x", "L0.MLP@x", "L0.H0@last"]
    unit = heads.index(["L1.H2@last"])[0]
    assert (unit.layer, unit.col, unit.mib_node) == (1, 6, "a1.h2@last")
    assert unit.transformerlens == {"hook": "blocks.1.attn.hook_z", "head": 2, "position": "last"}
    resid = ComponentSpace(3, 3, 4, kind="residual", positions=("-2", "last"))
    assert resid.names() == [
        "L0.resid@-2",
        "L0.resid@last",
        "L1.resid@-2",
        "L1.resid@last",
        "L2.resid@-2",
        "L2.resid@last",
    ]
    assert resid.index(["L2.resid@last"])[0].transformerlens["hook"] == "blocks.2.hook_resid_pre"
    neurons = ComponentSpace(2, 3, 4, kind="neurons", group_size=16, mlp_width=64)
    assert neurons.shape == (2, 4) and neurons.names()[5] == "L1.MLP[16:32]@last"
    assert neurons.index(["L1.MLP[16:32]@last"])[0].transformerlens == {
        "hook": "blocks.1.mlp.hook_post", "head": None, "position": "last", "neurons": [16, 32]
    }  # fmt: skip
    assert ComponentSpace(1, 2, 4, kind="neurons", mlp_width=4).names()[1] == "L0.MLP[1]@last"
    default = ComponentSpace(2, 3, 4)
    assert default.index(["L1.H2@last"]) == default.index(["L1.H2"])  # the paper's names, `@last` allowed
    with pytest.raises(CircuitfindError, match=r"unknown unit\(s\) L1.H2@y \(did you mean L1.H2@x"):
        heads.index(["L1.H2@y"])


def final_hidden_counting_tokens(job, prep, masks) -> tuple[torch.Tensor, int]:
    """The masks' final hidden states, and how many prompt tokens their runs computed (rows x tokens)."""
    tokens = []
    embed = job.model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: tokens.append(out.shape[:2].numel())
    )
    with embed:
        return job.engine.final_hidden(prep, masks), sum(tokens)


@pytest.fixture(scope="module")
def positions_job():
    return Job(compose(*QUIET, 'units.positions=[last,x,"xname#2"]'))


def test_slot_positions_are_found_and_aligned_in_base_and_alternate(positions_job):
    job = positions_job
    enc = job.encoded[("vd", "train")]
    pair = job.data["vd"].train[0]
    assert enc.base_pos.shape == (len(enc), 3, 2)  # x is two digits; last and xname#2 one token
    tokens = [job.tokenizer.decode([int(enc.base_ids[0, t])]) for t in enc.base_pos[0, 1]]
    assert "".join(tokens) == str(pair.base.problem.env["x"])  # the character tokenizer: one token per digit
    alt_tokens = "".join(job.tokenizer.decode([int(enc.alt_ids[0, t])]) for t in enc.alt_pos[0, 1])
    assert alt_tokens == str(pair.alt.problem.env["x"]) != tokens  # VD's alternate changes x
    assert int(enc.base_pos[0, 0, 0]) == enc.base_ids.shape[1] - 1 and int(enc.base_pos[0, 0, 1]) == -1
    query_name = job.tokenizer.decode([int(enc.base_ids[0, enc.base_pos[0, 2, 0]])])
    assert query_name == "x" and int(enc.base_pos[0, 2, 0]) > int(enc.base_pos[0, 1, 1])  # the second mention


@pytest.mark.parametrize(
    "units",
    [
        ("units.positions=[last,x]",),
        ("units=residual", "units.positions=[x,last]"),
        ("units=residual",),  # every position: a site at the first token, nothing to cache
        ("units=neurons", "units.positions=[x,last]"),
    ],
)
def test_cached_engine_runs_the_suffix_from_the_earliest_site_and_equals_the_full_engine(units):
    job = Job(compose(*QUIET, *units))
    prep = job.prepared("vd", "train")[0]
    first = int(prep.where.base_tok.min())
    assert prep.offset == first  # the prefix, before the earliest site, runs once ...
    assert prep.prefix_kv is None if first == 0 else prep.prefix_kv[0][0].shape[2] == first  # ... if there is one
    full = Job(compose(*QUIET, *units, "engine=full"))
    full_prep = full.prepared("vd", "train")[0]
    torch.manual_seed(0)
    mask = torch.rand(2, *job.space.shape, requires_grad=True)
    cached_h = job.engine.final_hidden(prep, mask)
    full_h = full.engine.final_hidden(full_prep, mask)
    assert torch.allclose(cached_h, full_h, atol=2e-5)
    (g_cached,) = torch.autograd.grad(cached_h.sum(), mask)
    (g_full,) = torch.autograd.grad(full_h.sum(), mask)
    assert torch.allclose(g_cached, g_full, atol=2e-4) and bool(g_full.abs().sum() > 0)
    keep = job.engine.final_hidden(prep, torch.ones(1, *job.space.shape))
    assert torch.equal(keep, job.engine.final_hidden(prep, None))  # w = 1 everywhere is no patch, bit for bit


@pytest.mark.parametrize(
    "units",
    [
        (),  # the paper's space: one position, later layers only
        ('units.positions=[last,x,"xname#2"]',),
        ('units.positions=[last,x,"xname#2"]', "cache=cpu"),
        ('units.positions=[last,x,"xname#2"]', "cache=recompute"),  # no clean run kept: every layer runs
        ("units=residual", "units.positions=[x,last]"),
        ("units=residual",),  # every position: some masks run the whole prompt, others a suffix
        ("units=neurons", "units.positions=[x,last]"),
    ],
)
def test_each_circuit_runs_from_the_first_token_and_layer_it_patches_and_equals_the_full_engine(units):
    """Pruning's masks patch units at some positions and layers only: each group runs from its own first
    patched token and layer, on the clean keys/values before it and the clean residual stream entering it,
    and a later group never reads what an earlier one wrote."""
    job = Job(compose(*QUIET, *units))
    full = Job(compose(*QUIET, *(u for u in units if not u.startswith("cache=")), "engine=full"))
    space, prep, full_prep = job.space, job.prepared("vd", "train")[0], full.prepared("vd", "train")[0]
    n_pos, n_layers, block = len(space.positions), space.n_layers, space.per_position
    starts = [int(prep.where.base_tok[prep.where.slot == p].min()) for p in range(n_pos)]
    torch.manual_seed(0)
    masks, expected_starts = [], []
    for p in range(n_pos):
        for layer in (0, n_layers // 2, n_layers - 1):
            for later in (False, True):  # position p alone, or p and every later one
                upto = n_pos if later else p + 1
                mask = torch.ones(n_layers, n_pos, block)
                mask[layer:, p:upto] = (torch.rand(n_layers - layer, upto - p, block) < 0.5).float()
                mask[layer, p, 0] = 0  # at least one unit at (layer, p)
                masks.append(mask)
                expected_starts.append([min(starts[p:upto]), 0 if "cache=recompute" in units else layer])
    masks = torch.stack(masks + [torch.ones(n_layers, n_pos, block)]).view(-1, *space.shape)  # the last: no patch
    assert job.engine.first_patched(prep, masks).tolist() == expected_starts + [[prep.offset, 0]]
    expected = full.engine.final_hidden(full_prep, masks)
    for order in (torch.arange(len(masks)), torch.arange(len(masks)).flip(0), torch.randperm(len(masks))):
        got = torch.empty_like(expected)
        for chunk in order.split(4):  # chunks that mix groups, in orders that move the clean part both ways
            got[chunk] = job.engine.final_hidden(prep, masks[chunk])
        assert torch.allclose(got, expected, atol=2e-5)
    assert torch.equal(job.engine.final_hidden(prep, masks[-1:]), job.engine.final_hidden(prep, None))
    assert all(type(layer).__name__ != "SkippedLayer" for layer in job.sites.layer_stack), "every layer is back"
    if "cache=recompute" in units or prep.offset == 0:
        return  # no clean run is kept, or none comes from a suffix run
    fresh = job.engine.prepare(prep.pairs)  # pruning scores J(none) first: its run is the clean run, kept
    job.engine.final_hidden(fresh, masks[[-1, 0]])
    made = fresh.clean
    assert made is not None and job.engine._clean_run(fresh) is made
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(made.resid, job.engine._clean_run(prep).resid))
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(sum(made.kv, ()), sum(job.engine._clean_run(prep).kv, ()))
    )
    assert torch.allclose(job.engine.final_hidden(fresh, masks), expected, atol=2e-5)


@pytest.mark.parametrize(
    "units",
    [
        ('units.positions=[last,x,"xname#2"]',),
        ('units.positions=[last,x,"xname#2"]', "cache=cpu"),
        ("units=residual", "units.positions=[x,last]"),
        ("units=residual",),  # every position: the earlier part may start at the first token, and then runs whole
        ("units=neurons", "units.positions=[x,last]"),
    ],
)
def test_masks_that_patch_the_same_units_before_their_latest_position_run_that_part_once(units):
    """Swap and put-in trials differ at the final token but patch the same unit at x: the run of tokens x to the
    final one is shared, and each mask runs its final part on it, equal to the full engine. A mask that patches the
    first earlier part alone (the exact search's circuit beside a swap round's trials) shares that run too."""
    job = Job(compose(*QUIET, *units))
    full = Job(compose(*QUIET, *(u for u in units if not u.startswith("cache=")), "engine=full"))
    space, prep, full_prep = job.space, job.prepared("vd", "train")[0], full.prepared("vd", "train")[0]
    n_layers, block, b, width = space.n_layers, space.per_position, len(prep.pairs), prep.pairs.base_ids.shape[1]
    by_token = sorted(range(len(space.positions)), key=lambda p: int(prep.slot_starts[p]))
    late, earlier = by_token[-1], by_token[-3:-1]  # the latest position, and the two before it
    torch.manual_seed(0)
    parts = [torch.ones(n_layers, len(space.positions), block)]  # (a placeholder, dropped below)
    for layer in (0, n_layers // 2):  # earlier parts starting at two layers, at one or two positions
        for upto in (1, 2):
            mask = parts[0]
            while any(torch.equal(mask, part) for part in parts):  # distinct parts, even with one unit per position
                mask = torch.ones(n_layers, len(space.positions), block)
                at = earlier[-upto:]
                mask[layer:, at] = (torch.rand(n_layers - layer, len(at), block) < 0.3).float()
                mask[layer, earlier[-1], 0] = 0
            parts.append(mask)
    parts, masks = parts[1:], []
    for part in parts:
        for layer in (0, n_layers - 1):  # later parts from below and above the earlier part's first layer
            for _ in range(2):
                mask = part.clone()
                mask[layer:, late] = (torch.rand(n_layers - layer, block) < 0.3).float()
                mask[layer, late, 0] = 0
                masks.append(mask)
    alone = [parts[0], masks[0] * 0 + torch.where(parts[0] < 1, 1.0, masks[0]), torch.ones_like(parts[0])]
    masks = torch.stack(masks + alone).view(-1, *space.shape)  # the last three: earlier part only, later only, none
    n_split = len(masks) - len(alone)
    late_token, first = int(prep.slot_starts[late]), job.engine.first_patched(prep, masks)[:, 0].tolist()
    shared = [late_token if first[i] > 0 else -1 for i in range(n_split)]  # a part from the first token runs whole
    shared.append(shared[0])  # the first earlier part alone: its tokens from the later part's on run unpatched
    assert job.engine.late_starts(prep, masks).tolist() == shared + [-1, -1]
    groups = job.engine.run_groups(prep, masks)
    for i in range(0, n_split, 4):  # the four masks of each earlier part (the first's: five) are one group
        group = {*range(i, i + 4), *([n_split] if i == 0 else [])}
        assert shared[i] < 0 or group in [set(g) for g in groups]
    assert sorted(i for g in groups for i in g) == list(range(len(masks)))

    job.engine.clean_final(prep, keep=True)  # the clean run, kept (not counted below): a mask that patches nothing
    got, tokens = final_hidden_counting_tokens(job, prep, masks)
    starts = [first[i] if s < 0 else s for i, s in enumerate(shared)]  # each mask's own part, from where it starts
    parts_run = {first[i] for i, s in enumerate(shared) if s >= 0}  # one run per earlier part
    whole = sum(width - t for t in first)
    expected_tokens = sum(width - t for t in starts) + width - first[n_split + 1]  # nothing patched: the kept state
    expected_tokens += sum(late_token - first[i] for i in range(0, n_split, 4) if shared[i] >= 0)
    if parts_run:
        assert tokens == b * expected_tokens < b * whole
    expected = full.engine.final_hidden(full_prep, masks)
    assert torch.allclose(got, expected, atol=2e-5)
    for order in (torch.arange(len(masks)), torch.randperm(len(masks))):
        got = torch.empty_like(expected)
        for chunk in order.split(5):  # chunks that split the parts' masks, and mix them with the others
            got[chunk] = job.engine.final_hidden(prep, masks[chunk])
        assert torch.allclose(got, expected, atol=2e-5)
    assert all(type(layer).__name__ != "SkippedLayer" for layer in job.sites.layer_stack), "every layer is back"


def test_an_earlier_part_shared_by_later_parts_at_several_tokens_runs_once_to_the_latest_of_them():
    """Over every token of the residual stream a pruned circuit's trials keep one unit at x and swap the other
    between tokens: that unit's run goes once to the latest of them, and each trial runs from its own token."""
    job = Job(compose(*QUIET, "units=residual"))
    full = Job(compose(*QUIET, "units=residual", "engine=full"))
    space, prep, full_prep = job.space, job.prepared("vd", "train")[0], full.prepared("vd", "train")[0]
    width, b = prep.pairs.base_ids.shape[1], len(prep.pairs)
    by_token = sorted(range(len(space.positions)), key=lambda p: int(prep.slot_starts[p]))
    first, later = by_token[5], [by_token[9], by_token[14], by_token[-1]]
    masks = []
    for position in later:
        for layer in (0, space.n_layers - 1):
            mask = torch.ones(space.n_layers, len(space.positions), 1)
            mask[0, first] = mask[layer, position] = 0
            masks.append(mask)
    masks = torch.stack(masks).view(-1, *space.shape)
    starts = [int(prep.slot_starts[p]) for p in later for _ in range(2)]
    assert job.engine.late_starts(prep, masks).tolist() == starts
    job.engine.clean_final(prep, keep=True)
    got, tokens = final_hidden_counting_tokens(job, prep, masks)
    once = max(starts) - int(prep.slot_starts[first])
    assert tokens == b * (once + sum(width - t for t in starts))
    assert torch.allclose(got, full.engine.final_hidden(full_prep, masks), atol=2e-5)


def test_units_at_tokens_the_alternates_share_with_the_base_prompt_patch_nothing_and_the_circuit_runs_without_them():
    """OI's alternates change only the operator: a unit at x or at the query name patches in its clean value, so a
    circuit runs from its units at the final token, equal to the full engine, which patches every unit; a circuit
    with none there is the clean run, and circuits are grouped by the runs they share without it. Values other
    than the alternates' (an ablation) are patched everywhere."""
    units = 'units.positions=[last,x,"xname#2"]'
    job, full = Job(compose(*QUIET, units)), Job(compose(*QUIET, units, "engine=full"))
    space, prep, full_prep = job.space, job.prepared("oi", "train")[0], full.prepared("oi", "train")[0]
    last, b = space.positions.index("last"), len(prep.pairs)
    masks = torch.ones(3, space.n_layers, len(space.positions), space.per_position)
    masks[:, 0, [p for p in range(len(space.positions)) if p != last]] = 0  # every unit at x and the query name
    masks[1, 2, last, 1] = masks[2, 3, last, 0] = 0  # and a unit at the final token, at two layers
    masks = masks.view(3, *space.shape)
    clean = job.engine.clean_final(prep, keep=True)
    got, tokens = final_hidden_counting_tokens(job, prep, masks)
    assert tokens == 2 * b  # the final token of the last two; the first is the kept clean run
    assert torch.equal(got[0], clean)
    assert torch.allclose(got, full.engine.final_hidden(full_prep, masks), atol=2e-5)
    zeros = job.engine.final_hidden(prep, masks[:1], prep.alt_values.map(torch.zeros_like))
    assert torch.allclose(
        zeros, full.engine.final_hidden(full_prep, masks[:1], full_prep.alt_values.map(torch.zeros_like)), atol=2e-5
    )
    assert not torch.allclose(zeros[0], clean, atol=1e-3)
    trials = torch.ones(2, space.n_layers, len(space.positions), space.per_position)
    trials[:, 0, space.positions.index("x"), 0] = 0  # one head at x, beside a different unit at the final token each
    trials[0, 2, last, 1] = trials[1, 3, last, 0] = 0
    trials = trials.view(2, *space.shape)
    assert job.engine.run_groups(job.prepared("vd", "train")[0], trials) == [[0, 1]]  # VD's: they share x's run
    assert job.engine.run_groups(prep, trials) == [[0], [1]]  # OI's: x patches nothing, no run to share


@pytest.mark.parametrize("units", [("units.positions=[last,x]",), ("units=residual", "units.positions=[x,last]")])
def test_a_later_part_runs_from_the_layer_the_earlier_part_reaches_it(units):
    """A head's patch at x changes x's residual stream after its layer: the final token reads it through the next
    layer's keys and values, so a later part runs from there (the residual stream entering a layer reaches it at
    that layer). So do the tokens after x: the earlier part runs its first layer on x's tokens only."""
    job = Job(compose(*QUIET, *units))
    full = Job(compose(*QUIET, *units, "engine=full"))
    space, prep, full_prep = job.space, job.prepared("vd", "train")[0], full.prepared("vd", "train")[0]
    x, last = space.positions.index("x"), space.positions.index("last")
    x_start, width, b, n_layers = (
        int(prep.slot_starts[x]),
        prep.pairs.base_ids.shape[1],
        len(prep.pairs),
        space.n_layers,
    )
    masks = torch.ones(2, n_layers, len(space.positions), space.per_position)
    masks[:, 0, x, 0] = 0  # layer 0 at x, shared; layer 2 at the final token, a different unit each
    masks[0, 2, last, 0] = masks[1, 2, last, -1] = 0
    masks = masks.view(2, *space.shape)
    job.engine.clean_final(prep, keep=True)  # the clean run, kept (not counted below)
    counted = [0] * n_layers

    def count(i):
        def add(module, args, kwargs):
            counted[i] += (args or [kwargs["hidden_states"]])[0].shape[:2].numel()

        return add

    hooks = [
        layer.register_forward_pre_hook(count(i), with_kwargs=True) for i, layer in enumerate(job.sites.layer_stack)
    ]
    with torch.no_grad():
        got = job.engine.final_hidden(prep, masks)
    for h in hooks:
        h.remove()
    shared = b * (width - 1 - x_start)  # x to the final token, once
    x_tokens = b * (int(prep.slot_ends[x]) + 1 - x_start)
    first = x_tokens if job.engine.reach else shared + b * 2
    assert counted == [first] + [shared + b * 2] * (n_layers - 1)
    assert torch.allclose(got, full.engine.final_hidden(full_prep, masks), atol=2e-5)


@pytest.mark.parametrize("units", [("units.positions=[last,x]",), ("units=residual",)])  # a prefix, and none
def test_pairs_that_circuits_are_scored_on_keep_their_clean_run_and_a_mask_that_patches_nothing_reads_it(units):
    """Pruning's J(none) and every later start need the clean run of the validation pairs: it is the run d0 comes
    from, kept, and a mask that patches nothing is given its final state without running (so d(none) = d0)."""
    job = Job(compose(*QUIET, *units))
    pairs = job.prepared("vd", "train")[0].pairs
    kept, plain = job.engine.prepare(pairs), job.engine.prepare(pairs)
    final = job.engine.clean_final(kept, keep=True)
    assert kept.clean is not None and kept.clean.final is final and plain.clean is None
    if kept.offset > 0:  # run as a step that patches nothing: bit for bit the unkept d0
        assert torch.equal(final, job.engine.clean_final(plain))
    assert torch.allclose(final, job.engine.clean_final(plain), atol=1e-5)
    tokens = []
    embed = job.model.get_input_embeddings().register_forward_hook(lambda m, a, out: tokens.append(out.shape[0]))
    with embed, torch.no_grad():
        nothing = job.engine.final_hidden(kept, torch.ones(2, *job.space.shape))
    assert tokens == [] and torch.equal(nothing, final.expand(2, -1, -1))
    for objective in job.objectives("validation"):  # prepared when first scored: d0 from the kept clean run
        assert objective.batches.prepared == 0
        assert objective.d0[0] is not None and objective.batches[0].clean is not None
    assert all(b.clean is None for o in job.objectives("train") for b in o.batches)  # trained: never needed


def test_patching_the_first_layers_residual_everywhere_is_the_alternates_run():
    job = Job(compose(*QUIET, "units=residual"))
    prep = job.prepared("vd", "train")[0]
    mask = torch.ones(1, *job.space.shape)
    mask[0, 0] = 0  # layer 0's residual stream at every position, from the alternate
    assert torch.allclose(job.engine.final_hidden(prep, mask)[0], prep.alt_hidden, atol=1e-5)
    assert not torch.allclose(job.engine.final_hidden(prep, None)[0], prep.alt_hidden, atol=1e-2)


def test_a_neuron_group_patch_replaces_exactly_those_neurons_at_that_position():
    job = Job(compose(*QUIET, "units=neurons", "units.group_size=32", "engine=full"))
    prep = job.prepared("vd", "train")[0]
    unit = job.space.index(["L3.MLP[64:96]@last"])[0]
    mask = torch.ones(1, *job.space.shape)
    mask[0, unit.layer, unit.col] = 0
    alt = prep.alt_values.points["neurons"][3]  # (B, 256) the alternates' neurons at the final token

    def by_hand(module, args):
        x = args[0].clone()
        x[:, -1, 64:96] = alt[:, 64:96]
        return (x,)

    handle = job.sites.mlp_downs[3].register_forward_pre_hook(by_hand)
    try:
        expected = job.engine.final_hidden(prep, None)
    finally:
        handle.remove()
    assert torch.allclose(job.engine.final_hidden(prep, mask), expected, atol=1e-6)
    with record_values(job.sites, prep.where.rows, prep.where.alt_tok) as values:
        job.engine._run(prep.pairs.alt_ids, prep.pairs.alt_attn)
    assert torch.equal(values.points["neurons"][3], alt)


@pytest.mark.e2e
def test_dbm_finds_the_planted_heads_at_the_final_position_among_several_positions(tmp_path):
    """The organism's circuit is planted at the final position: with x's and the query's positions on offer,
    DBM's rounded mask also patches redundant routes at x, and pruning leaves exactly the planted heads;
    the run's names, exports and eval all carry positions."""
    run = tmp_path / "run"
    run_search(compose(*QUIET, 'units.positions=[last,x,"xname#2"]'), run)
    record = read_record(run)
    names = record.names
    assert sorted(names) == sorted(f"{h}@last" for h in PLANTED) and record.planted["exact"]
    assert record.raw["n_patched"] > 4 and any(n.endswith("@x") for n in record.raw["circuit"])
    assert record.metrics["vd_test/acc"] >= 0.98 and record.model["units"]["positions"] == ["last", "x", "xname#2"]
    heads = [row["name"] for row in record.circuit if row["kind"] == "head"]
    assert sorted(record.attention) == sorted(heads)  # where each head looks from its own position
    assert all(sum(masses.values()) == pytest.approx(1, abs=1e-3) for masses in record.attention.values())
    hooks = json.loads((run / "transformerlens.json").read_text())["circuit"]
    assert {h["position"] for h in hooks} <= {"last", "x", "xname#2"} and len(hooks) == len(names)
    mib = json.loads((run / "mib" / "importances.json").read_text())
    assert "a2.h1@last" in mib["nodes"] and mib["cfg"]["units"]["positions"] == ["last", "x", "xname#2"]
    job = Job(compose(*QUIET, 'units.positions=[last,x,"xname#2"]'))
    assert (
        read_circuit(str(run / "mib" / "importances.json"), job.space).names == read_circuit(str(run), job.space).names
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("units.positions=[last,z]",),
            r"units.positions: 'z' is not a position of task arithmetic; choose from last, all, ",
        ),
        (
            ("units=neurons", "units.group_size=48"),
            r"units.group_size=48 does not divide the MLP width 256; give a divisor",
        ),
        (("units.positions=[x,all]",), r"`all` already covers every position; give it alone"),
        (
            ("units.memory_gb=0.000001",),
            r"would need about .* GiB .* units.memory_gb allows 0.0 GiB; lower optimizer.batch_size",
        ),
        (("units.positions=[last,x]", "optimizer.target_size=80"), r"target_size=80 is more than the model's 72 units"),
        (("units=residual", "units.group_size=4"), r"units.group_size applies to units=neurons only"),
        (("units.kind=edges",), r"units.kind='edges' is unknown; choose from heads_mlps, residual, neurons"),
    ],
)
def test_bad_units_are_one_line_naming_the_fix(overrides, message):
    with pytest.raises(CircuitfindError, match=message) as e:
        Job(compose(*QUIET, *overrides))
    assert "\n" not in str(e.value)


def test_positions_that_cannot_be_aligned_say_why():
    # a one- or two-digit x: the base's x and the alternate's are not as many tokens
    with pytest.raises(CircuitfindError, match=r"'x' is \d token\(s\) in the base prompt and \d in the alternate"):
        Job(compose(*QUIET, "units.positions=[x]", "task.slots.x.range=[5,60]"))
    with pytest.raises(CircuitfindError, match=r"units.positions: x and -18 share tokens in pair 0"):
        Job(compose(*QUIET, "units.positions=[x,-18]"))  # x's first digit is the 18th token from the end


def test_eval_takes_positional_names_and_unit_figures_are_drawn(cli, tmp_path):
    out = tmp_path / "eval"
    res = cli(
        "eval",
        *QUIET,
        "units.positions=[last,x]",
        "circuit=[L2.H1@last,L2.H3@last,L2.H4,L2.H6@last]",
        "--out",
        str(out),
    )
    assert res.returncode != 0 and "unknown unit(s) L2.H4 (did you mean L2.H4@last, L2.H4@x" in res.stderr
    res = cli("eval", *QUIET, "units.positions=[last,x]", "circuit=[L2.H1@last,L2.H3@last,L0.H4@x]", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "eval.json").read_text())["circuit"] == ["L0.H4@x", "L2.H1@last", "L2.H3@last"]
    run = tmp_path / "neurons"
    res = cli(
        "train",
        *(q for q in QUIET if q != "plots=false"),
        "units=neurons",
        "units.group_size=64",
        f"hydra.run.dir={run}",
    )
    assert res.returncode == 0, res.stderr
    assert (run / "mask_heatmap.png").stat().st_size > 0 and (run / "neurons.png").stat().st_size > 0


def test_mean_ablation_refuses_a_token_no_reference_prompt_has():
    """Reference prompts with two-digit x; a site at a third token of x must not take another position's mean."""
    from circuitfind.evaluation.ablation import Ablation
    from circuitfind.model.hooks import SiteIndex

    job = Job(compose(*QUIET, "units.positions=[x,last]"))
    ablation = Ablation("mean", job.reference())
    two_digits = SiteIndex(
        *(torch.tensor([0, 0, 0]) for _ in range(2)),
        torch.tensor([0, 1, 0]),
        *(torch.zeros(3, dtype=torch.long) for _ in range(2)),
    )
    assert ablation.mean_at(two_digits).points["heads"][0].shape[0] == 3
    third = SiteIndex(
        *(torch.tensor([0]) for _ in range(2)), torch.tensor([2]), *(torch.zeros(1, dtype=torch.long) for _ in range(2))
    )
    with pytest.raises(CircuitfindError, match="more tokens in these prompts than in any reference prompt"):
        ablation.mean_at(third)
