"""The shared trunk: found from the weights, run once, checked against the generalist; the
ensemble's waves and the closed-form combination of one-specialist rows."""

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.models import group_parameters

from specialists import manifest
from specialists.cli import main
from specialists.combination import Combination
from specialists.combiner import _one_specialist_blocks, combine, objective, solve_em
from specialists.ensemble import Ensemble, _take
from specialists.errors import SpecialistsError
from specialists.gating import GroupIndex, gate
from specialists.models import create_model
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import file_sha256, save_json, save_tensors
from specialists.train.loop import keep_frozen_fixed
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig, _set_trainable
from specialists.trunk import Traced, find_shared_trunk, suffix_module, with_activations

from .conftest import TINY_DATA
from .test_specialists import run_dir  # noqa: F401  (the shared tiny run fixture)


def _specialist_of(generalist, change: str):
    """A copy of ``generalist`` with a new 5-way head; ``change`` = head | last | all says
    which of its weights then differ from the generalist's."""
    model = copy.deepcopy(generalist)
    model.reset_classifier(5)
    if change != "head":
        groups = group_parameters(model, model.group_matcher(coarse=True))
        names = [
            n for g in (sorted(groups)[-2:] if change == "last" else groups) for n in groups[g]
        ]
        state = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                state[n].add_(0.01)
    return model.eval()


@pytest.mark.parametrize("arch,size", [("test_efficientnet", 16), ("test_vit", 32)])
def test_the_trunk_is_found_from_the_weights_and_runs_once(arch, size):
    torch.manual_seed(0)
    g = create_model(arch, 12, 3, size).eval()
    x = torch.randn(6, 3, size, size)
    head = find_shared_trunk(_specialist_of(g, "head"), g)
    last = find_shared_trunk(_specialist_of(g, "last"), g)
    assert find_shared_trunk(_specialist_of(g, "all"), g) is None  # the stem moved: none
    assert head is not None and last is not None
    assert last.n_tensors < head.n_tensors  # the last stage is the specialist's own
    for change, trunk in (("head", head), ("last", last)):
        model = _specialist_of(g, change)
        own = suffix_module(model, trunk.cut)
        runner = with_activations(g, [trunk.cut])
        with torch.no_grad():
            out, acts = runner(x)
            assert torch.equal(out, g(x))  # the generalist's answer is unchanged
            assert torch.allclose(own(acts[trunk.cut]), model(x), atol=1e-6)
        n_own = sum(p.numel() for p in own.parameters())
        assert n_own < sum(p.numel() for p in model.parameters())
        if change == "head":  # only the classifier is the specialist's own
            assert n_own == sum(p.numel() for p in model.get_classifier().parameters())


def test_frozen_layers_keep_their_batch_norm_statistics():
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 5, 3)
    _set_trainable(model, "last")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    keep_frozen_fixed(model)
    model(torch.randn(8, 3, 16, 16))
    after = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    stats = [k for k in after if k.endswith("running_mean")]
    moved = {k for k in stats if not torch.equal(before[k], after[k])}
    owner = {k: k.rsplit(".", 1)[0] + ".weight" for k in stats}
    assert moved and all(owner[k] not in frozen for k in moved)  # trained layers still learn
    assert all(owner[k] in frozen for k in stats if k not in moved)
    assert model.training and model.conv_stem.training  # the flag itself is left alone


@pytest.fixture(scope="module")
def shared_runs(run_dir, tmp_path_factory):  # noqa: F811
    """The tiny run with specialists trained `--trainable last` and `--trainable head`."""
    runs = {}
    for mode in ("last", "head"):
        out = tmp_path_factory.mktemp(f"trunk_{mode}") / "run"
        shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
        cfg = SpecialistConfig(epochs=1, batch_size=32, examples_per_epoch=128, trainable=mode)
        train_specialists(out, cfg, workers=1, progress=False, calibrate=False)
        runs[mode] = out
    return runs


@pytest.mark.parametrize("mode", ["last", "head"])
def test_the_shared_trunk_path_equals_the_plain_path(shared_runs, mode):
    run = shared_runs[mode]
    records = [json.loads(RunDir.of(run).specialist(i).record.read_text()) for i in range(3)]
    assert all(r["shared_trunk"] and r["shared_trunk"]["n_tensors"] > 0 for r in records)
    images = load_data(TINY_DATA).test.images
    for top_n in (1, 2):
        comb = Combination(top_n=top_n)
        shared = Ensemble.load(run, combination=comb)
        plain = Ensemble.load(run, combination=comb, shared_trunk=False)
        assert len(shared.trunks) == 3 and not plain.trunks
        a, b = shared.run_batch(images), plain.run_batch(images)
        assert np.abs(a.q - b.q).max() <= 1e-5
        assert a.consulted == b.consulted
        # inference holds only the layers each specialist trained: all the frozen ones shared
        model = create_model("test_efficientnet", 5, 3)
        _set_trainable(model, mode)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        for module in shared.loaded.values():
            assert {n for n, _ in module.named_parameters()} == trained
        # the module's forward takes the same path
        x = shared.preprocess(images[:10])
        assert torch.allclose(shared(x).exp(), torch.from_numpy(b.q[:10]), atol=1e-5)


def test_whole_members_run_as_their_traced_graphs(shared_runs):
    """Whole members run their fx graphs: the same answers bit for bit as their modules, and
    export and calibration still get the model itself."""
    ens = Ensemble.load(shared_runs["last"], combination=Combination(), shared_trunk=False)
    images = load_data(TINY_DATA).test.images[:64]
    x = ens.preprocess(images)
    with torch.inference_mode():
        assert torch.equal(ens._plain_generalist(x), ens.generalist(x))
        rec = ens.specialists[0]
        runner = ens.specialist(0)
        assert isinstance(runner, Traced) and runner.model is ens.load_specialist(rec)
        assert torch.equal(runner(x), runner.model(x))
    assert type(ens.load_specialist(rec)).__name__ == "EfficientNet"
    assert np.array_equal(ens.generalist_proba(images), torch.softmax(ens.generalist(x), 1).numpy())


def test_a_generalist_whose_stages_differ_is_refused(shared_runs, tmp_path, capsys):
    run = shared_runs["last"]
    ens = Ensemble.load(run)
    generalist = copy.deepcopy(ens.generalist)
    with torch.no_grad():
        generalist.bn1.running_var.mul_(1.5)  # the stem's statistics: part of every trunk
    with pytest.raises(SpecialistsError, match=r"000\.safetensors: specialist 0 was trained on"):
        Ensemble(
            generalist,
            ens.record,
            ens.all_specialists,
            specialist_weights=ens.specialist_weights,
            combination=Combination(),
        )
    # the run's own record says another trunk (edited by hand): one line, exit status 2
    copy_run = tmp_path / "run"
    shutil.copytree(run, copy_run)
    path = RunDir.of(copy_run).specialist(1).record
    record = json.loads(path.read_text())
    record["shared_trunk"]["sha256"] = "0" * 64
    save_json(path, record)
    manifest.register(copy_run, path)
    capsys.readouterr()
    assert main(["evaluate", str(copy_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "001.safetensors: specialist 1 was trained on the generalist's stages" in err


def test_a_specialist_whose_own_stages_differ_is_refused(shared_runs, tmp_path):
    """Its file is intact (its checksum is the record's) but its copy of the shared stages is
    not what the record says it shares: one error naming the file, at first use."""
    ens = Ensemble.load(shared_runs["last"], combination=Combination())
    rec = ens.specialists[0]
    state = ens.load_specialist(rec).state_dict()
    state["bn1.running_mean"] = state["bn1.running_mean"] + 0.5
    path = tmp_path / "000.safetensors"
    save_tensors(path, state)
    records = [replace(rec, weights_sha256=file_sha256(path))] + ens.specialists[1:]
    weights = {**ens.specialist_weights, rec.id: path}
    tampered = Ensemble(
        ens.generalist, ens.record, records, specialist_weights=weights, combination=Combination()
    )
    images = load_data(TINY_DATA).test.images
    with pytest.raises(SpecialistsError, match=r"000\.safetensors: its stages up to"):
        tampered.predict_proba(images)


def test_a_cut_this_trace_does_not_have_runs_the_specialist_whole(shared_runs, caplog):
    """A record made under another torch or timm (its activation names another place, or none)
    is no reason to refuse: that specialist runs whole, with the same answers."""
    ens = Ensemble.load(shared_runs["last"], combination=Combination())
    moved = {**ens.specialists[1].shared_trunk, "cut": "no_such_activation"}
    records = [ens.specialists[0], replace(ens.specialists[1], shared_trunk=moved)]
    records += ens.specialists[2:]
    with caplog.at_level("WARNING"):
        other = Ensemble(
            ens.generalist,
            ens.record,
            records,
            specialist_weights=ens.specialist_weights,
            combination=Combination(),
        )
    assert sorted(other.trunks) == [0, 2] and "runs whole" in caplog.text
    images = load_data(TINY_DATA).test.images
    assert np.abs(other.predict_proba(images) - ens.predict_proba(images)).max() <= 1e-5


def test_waves_pool_rows_without_changing_answers(shared_runs):
    images = load_data(TINY_DATA).test.images
    ens = Ensemble.load(shared_runs["last"], combination=Combination())
    ens.batch_size = 16
    assert ens.wave_size(len(images)) == min(len(images), 16 * 3)
    pooled = ens.predict_proba(images)
    ens.wave_bytes = 0  # one batch at a time
    assert ens.wave_size(len(images)) == 16
    assert np.abs(ens.predict_proba(images) - pooled).max() <= 1e-6
    empty = ens.run_batch(images[:0])  # no images: empty answers, not an error
    assert empty.q.shape == (0, 12) and empty.consulted == []
    parts = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, 20)]
    rows = torch.tensor([0, 4, 5, 10, 19])
    assert torch.equal(_take(parts, rows), rows)
    assert torch.equal(_take(parts, rows[2:3]), rows[2:3])
    # inputs (channels-last from uint8 images, or contiguous), activations, a strided part:
    # the rows of the concatenation, in its layout
    for make in (
        lambda n: torch.randn(n, 6, 6, 3).permute(0, 3, 1, 2),
        lambda n: torch.randn(n, 3, 6, 6),
        lambda n: torch.randn(n, 16),
        lambda n: torch.randn(n, 4, 6, 6)[:, :, 1:4],
    ):
        parts = [make(5), make(4), make(11)]
        whole = torch.cat(parts)
        for picked in (rows, rows[2:3], torch.arange(20)):
            got = _take(parts, picked)
            assert torch.equal(got, whole[picked]) and got.stride() == whole[picked].stride()
    # one channel: the rows keep the channels-last strides of the images they came from (they
    # decide which convolution kernels run)
    gray = [torch.randn(n, 6, 6, 1).permute(0, 3, 1, 2) for n in (5, 4, 11)]
    got = _take(gray, rows)
    assert torch.equal(got, torch.cat(gray)[rows]) and got.stride() == (36, 1, 6, 1)
    tracked = [torch.randn(n, 3, requires_grad=True) for n in (5, 4, 11)]  # autograd: no out=
    assert torch.equal(_take(tracked, rows), torch.cat(tracked)[rows])


def test_compiled_and_channels_last_members_give_the_same_answers(shared_runs):
    images = load_data(TINY_DATA).test.images[:24]
    plain = Ensemble.load(shared_runs["head"], combination=Combination())
    compiled = Ensemble.load(shared_runs["head"], combination=Combination(), compile=True)
    compiled.compile_options = {"dynamic": True, "backend": "eager"}  # no C++ build in tests
    assert np.abs(compiled.predict_proba(images) - plain.predict_proba(images)).max() <= 1e-5
    assert len(compiled.loaded) > 0
    assert all(type(m).__name__ == "OptimizedModule" for m in compiled.loaded.values())
    assert type(compiled._runner["trunk"]).__name__ == "OptimizedModule"
    # the model itself for export and calibration, not the compiled wrapper
    whole = Ensemble.load(shared_runs["head"], combination=Combination(), compile=True)
    whole.compile_options = compiled.compile_options
    whole.trunks.clear()
    whole.predict_proba(images)
    rec = whole.specialists[0]
    assert type(whole.load_specialist(rec)).__name__ != "OptimizedModule"
    nhwc = Ensemble.load(shared_runs["last"], combination=Combination(), channels_last=True)
    plain = Ensemble.load(shared_runs["last"], combination=Combination())
    assert np.abs(nhwc.predict_proba(images) - plain.predict_proba(images)).max() <= 1e-5
    assert nhwc.generalist.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def _disjoint_instance(seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    k, sizes = 40, [3, 7, 10, 5, 15]
    groups = GroupIndex.from_lists(
        np.split(np.random.default_rng(seed).permutation(k), np.cumsum(sizes)[:-1]), n_classes=k
    )
    p_g = torch.softmax(3 * torch.randn(64, k, dtype=dtype), 1)
    pairs = gate(p_g, groups, 1)
    outs = [
        torch.softmax(2 * torch.randn(len(r), sizes[m] + 1, dtype=dtype), 1)
        for m, r in enumerate(pairs.per_specialist(len(sizes)))
        if len(r)
    ]
    weights = torch.rand(len(sizes), dtype=torch.float64) * 2
    return p_g, outs, pairs, groups, weights


@pytest.mark.parametrize("seed", range(3))
def test_one_specialist_rows_in_closed_form_are_the_optimum(seed):
    p_g, outs, pairs, groups, w = _disjoint_instance(seed)
    q = combine(p_g, outs, pairs, groups, spec_weights=w, generalist_weight=0.7)
    blocks = _one_specialist_blocks(p_g, outs, pairs, groups, w, 0.7)
    assert blocks is not None and torch.equal(q, blocks)  # the ensemble's path, taken
    em = solve_em(p_g, outs, pairs, groups, spec_weights=w, generalist_weight=0.7, tol=1e-14)
    assert em.n_iter > 1  # EM iterates; the closed form does not need to
    assert torch.allclose(q, em.q, rtol=0, atol=1e-12)
    f = objective(q, p_g, outs, pairs, groups, spec_weights=w, generalist_weight=0.7)
    for _ in range(5):  # no nearby distribution does better
        other = torch.softmax(torch.log(q) + 1e-3 * torch.randn_like(q), 1)
        g = objective(other, p_g, outs, pairs, groups, spec_weights=w, generalist_weight=0.7)
        assert bool((f <= g + 1e-12).all())


def test_rows_without_a_specialist_keep_the_generalist():
    """The cascade leaves sure rows with no pair: on the ensemble's path (blocks of rows) they
    come back as exactly p_g, and the others as the optimum."""
    p_g, outs, pairs, groups, w = _disjoint_instance(3)
    sure = p_g.max(1).values >= 0.5
    assert sure.any() and (~sure).any()
    cascade = gate(p_g, groups, 1, confidence=0.5)
    keep = ~sure[pairs.rows]
    blocks, start = [], 0
    for b in outs:
        blocks.append(b[keep[start : start + len(b)]])
        start += len(b)
    q = combine(p_g, blocks, cascade, groups, spec_weights=w)
    assert _one_specialist_blocks(p_g, blocks, cascade, groups, w, 1.0) is not None
    assert torch.equal(q[sure], p_g[sure])
    em = solve_em(p_g, blocks, cascade, groups, spec_weights=w, tol=1e-14)
    assert torch.allclose(q, em.q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_with_one_or_several_specialists_match_em(dtype):
    """Overlapping groups: some rows have two specialists (EM), the others one (closed form);
    blocks or one padded tensor, float32 or float64, all equal EM's optimum."""
    torch.manual_seed(1)
    k = 30
    lists = [list(range(0, 12)), list(range(8, 20)), list(range(20, 30))]
    groups = GroupIndex.from_lists(lists, n_classes=k)
    p_g = torch.softmax(2 * torch.randn(200, k, dtype=dtype), 1)
    pairs = gate(p_g, groups, 2)
    per_row = torch.bincount(pairs.rows, minlength=200)
    assert (per_row == 1).any() and (per_row == 2).any()
    blocks = [
        torch.softmax(torch.randn(len(r), len(lists[m]) + 1, dtype=dtype), 1)
        for m, r in enumerate(pairs.per_specialist(3))
        if len(r)
    ]
    padded = torch.zeros(pairs.n_pairs, 13, dtype=dtype)
    start = 0
    for b in blocks:
        padded[start : start + len(b), : b.shape[1]] = b
        start += len(b)
    em = solve_em(p_g, blocks, pairs, groups, tol=1e-13, max_iter=5000).q
    atol = 1e-6 if dtype == torch.float32 else 1e-8  # combine stops EM at its default tol
    for spec in (blocks, padded):
        q = combine(p_g, spec, pairs, groups)
        assert q.dtype == dtype and torch.allclose(q, em, rtol=0, atol=atol)


def test_the_ensemble_path_in_float32_and_at_a_denormal_outside_mass():
    """Blocks of float32 rows give EM's optimum; a float64 generalist whose mass outside the
    group is denormal (the closed form's factor overflows even float64) goes to EM, finite."""
    p_g, outs, pairs, groups, w = _disjoint_instance(4, dtype=torch.float32)
    assert _one_specialist_blocks(p_g, outs, pairs, groups, w, 1.0) is not None
    em = solve_em(p_g, outs, pairs, groups, spec_weights=w, tol=1e-9, max_iter=5000)
    q = combine(p_g, outs, pairs, groups, spec_weights=w)
    assert q.dtype == torch.float32 and torch.allclose(q, em.q, rtol=0, atol=1e-6)
    logits = torch.tensor([[2.0, 1.0, 0.5] + [-716.0] * 5], dtype=torch.float64)
    p_g = torch.softmax(logits, 1)  # G about 5e-312
    groups = GroupIndex.from_lists([[0, 1, 2], [3, 4, 5, 6, 7]], n_classes=8)
    pairs = gate(p_g, groups, 1)
    spec = [torch.tensor([[0.2, 0.1, 0.1, 0.6]], dtype=torch.float64)]
    assert _one_specialist_blocks(p_g, spec, pairs, groups, None, 1.0) is None
    for s in (spec, spec[0]):
        q = combine(p_g, s, pairs, groups)
        assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(1, dtype=q.dtype))


def test_a_block_that_mixes_specialists_is_read_pair_by_pair():
    """Blocks are any split of the pairs' rows: one holding pairs of two specialists (groups of
    equal size) gives what the pairs give one by one."""
    from specialists.gating import ActivePairs

    groups = GroupIndex.from_lists([[0, 1], [2, 3]], n_classes=5)
    torch.manual_seed(5)
    p_g = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    pairs = ActivePairs(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]))
    spec = torch.softmax(torch.randn(3, 3, dtype=torch.float64), 1)
    assert _one_specialist_blocks(p_g, [spec], pairs, groups, None, 1.0) is None
    q = combine(p_g, [spec], pairs, groups)
    assert torch.allclose(q, combine(p_g, spec, pairs, groups), rtol=0, atol=1e-12)
    for row, m in ((0, 0), (1, 1), (2, 0)):  # row by row, each with its own specialist
        one = combine(
            p_g[row : row + 1],
            [spec[row : row + 1]],
            ActivePairs(torch.tensor([0]), torch.tensor([m])),
            groups,
        )
        assert torch.allclose(q[row], one[0], rtol=0, atol=1e-12)


def test_the_closed_form_at_its_edges():
    # a group of every class: no mass outside it, so EM (which drops that dustbin) decides
    every = GroupIndex.from_lists([list(range(7))], n_classes=7)
    torch.manual_seed(2)
    p_g = torch.softmax(torch.randn(50, 7, dtype=torch.float64), 1)
    pairs = gate(p_g, every, 1)
    spec = [torch.softmax(torch.randn(50, 8, dtype=torch.float64), 1)]
    q = combine(p_g, spec, pairs, every)
    assert torch.allclose(q.sum(1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q, solve_em(p_g, spec, pairs, every).q, atol=1e-9)
    # a generalist so sure that the mass outside the group is denormal in float32: finite
    groups = GroupIndex.from_lists([[0, 1, 2], [3, 4, 5]], n_classes=6)
    p_g = torch.softmax(torch.tensor([[100.0, 0, 0, 0, 0, -20]]), 1)
    pairs = gate(p_g, groups, 1)
    spec = [torch.tensor([[0.5, 0.05, 0.05, 0.4]])]
    for s in (spec, spec[0]):
        q = combine(p_g, s, pairs, groups)
        assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(1))
        assert torch.allclose(q[0, 3:5], torch.tensor([0.1, 0.1]))  # the dustbin's 0.4 / 2
    assert torch.isfinite(solve_em(p_g, spec, pairs, groups).q).all()
