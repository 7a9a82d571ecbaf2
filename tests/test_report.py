"""Every number the report and the warning print: calls per layer, layers ghosted out of how
many, the layers not ghosted and why, for ``transform`` and the in-place API."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxghost

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4


class _OwnForward(nn.BatchNorm1d):
    """A BatchNorm subclass with a forward of its own: not ghosted unless registered."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Mixed(nn.Module):
    """Two ghostable layers (one called twice), a SyncBatchNorm, an unregistered subclass, an
    unused BatchNorm and two functional batch_norm calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.shared = nn.BatchNorm1d(6)
        self.once = nn.BatchNorm1d(6)
        self.sync = nn.SyncBatchNorm(6)
        self.own = _OwnForward(6)
        self.unused = nn.BatchNorm1d(6)
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(self.fc(x))
        y = self.shared(self.once(y))  # the shared layer's second call
        y = F.batch_norm(y, self.mean, self.var, training=False)
        y = F.batch_norm(y, self.mean, self.var, training=False)
        return self.own(self.sync(y))


def _warned(call: object) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()  # type: ignore[operator]
    texts = [
        str(w.message) for w in caught if issubclass(w.category, fxghost.PartialRewriteWarning)
    ]
    return result, texts


def test_transform_counts_calls_layers_and_functional_calls() -> None:
    model = Mixed()
    gm, texts = _warned(lambda: fxghost.transform(model, G))
    rep = fxghost.report(gm)  # type: ignore[arg-type]
    by_name = {r.name: r for r in rep.layers}
    assert rep.rewritten_names == ["shared", "once"]
    assert by_name["shared"].calls == 2 and by_name["once"].calls == 1
    functional = [r for r in rep.layers if r.kind.endswith(" call")]
    assert [r.rewritten for r in functional] == [False, False]
    assert sorted(r.name for r in rep.skipped if not r.kind.endswith(" call")) == [
        "own",
        "sync",
        "unused",
    ]
    assert rep.summary() == f"2 layer(s) rewritten with ghost_batch_size={G}, 5 skipped"

    # Modules counted as layers (5: two ghosted, the unused one, the subclass, SyncBatchNorm);
    # the functional calls need attention but are not layers.
    assert len(texts) == 1
    lines = texts[0].splitlines()
    assert lines[0] == "fxghost: ghosted 2 of 5 BatchNorm layers of Mixed; 4 need attention:"
    assert [line.split(" (")[0].strip() for line in lines[1:4]] == ["sync", "own", "batch_norm"]
    assert lines[4] == "  and 1 more"
    assert lines[-1] == "fxghost.report(result) lists every layer and why."
    rows = {row["layer"]: row for row in rep.rows()}
    assert (rows["once"]["channels"], rows["once"]["ghost size"], rows["once"]["status"]) == (
        6,
        G,
        "rewritten",
    )
    assert rows["unused"]["status"] == "skipped" and "unused" in str(rows["unused"]["why"])


def test_in_place_counts() -> None:
    model = Mixed()
    _, texts = _warned(lambda: fxghost.apply_ghost_batchnorm(model, G))
    rep = fxghost.report(model)
    assert rep.rewritten_names == ["shared", "once", "unused"]  # every module is ghosted
    assert [r.name for r in rep.skipped] == ["sync", "own"]
    assert rep.summary() == f"3 layer(s) rewritten with ghost_batch_size={G}, 2 skipped"
    assert len(texts) == 1
    assert texts[0].splitlines()[0] == (
        "fxghost: ghosted 3 of 5 BatchNorm layers of Mixed; 2 need attention:"
    )


def test_no_warning_when_everything_is_ghosted() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.BatchNorm1d(6))
    gm, texts = _warned(lambda: fxghost.transform(model, G))
    assert texts == [] and fxghost.report(gm).rewritten_names == ["1", "2"]  # type: ignore[arg-type]
    _, texts = _warned(lambda: fxghost.apply_ghost_batchnorm(model, G))
    assert texts == []


# What ran each layer lives with the layer: copies, pickles and new models report their own.


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_copies_report_what_they_ran() -> None:

    gm = fxghost.transform(
        _bn_net(), G, backend="cpu" if fxghost.backends.cpu.available() else "torch"
    )
    assert [r.backend for r in fxghost.report(gm).rewritten] == [""]  # never run
    gm(torch.randn(8, 3, 6, 6))
    ran = fxghost.report(gm).rewritten[0].backend
    assert ran
    duplicate = copy.deepcopy(gm)
    assert fxghost.report(pickle.loads(pickle.dumps(gm))).rewritten[0].backend == ran
    # The copy, moved to bfloat16, runs on torch ops: its report says so, the original's not.
    duplicate = fxghost.transform(duplicate, G, backend="torch").to(torch.bfloat16)
    duplicate(torch.randn(8, 3, 6, 6, dtype=torch.bfloat16))
    assert fxghost.report(duplicate).rewritten[0].backend.startswith("torch")
    assert fxghost.report(gm).rewritten[0].backend == ran


def test_new_models_never_report_a_run() -> None:
    """Reports used to be keyed by id(layer): a new model reused a dropped one's id, and with it
    that model's entry (31 to 69 stale reports in 200 models)."""
    stale = 0
    for _ in range(30):
        gm = fxghost.transform(_bn_net(), G)
        stale += bool(fxghost.report(gm).rewritten[0].backend)
        gm(torch.randn(8, 3, 6, 6))
        del gm
        gc.collect(1)  # frees the dropped model's cycles, so that the next may reuse its ids
    assert stale == 0


def _objects_kept(make: Callable[[], object], models: int) -> tuple[int, int]:
    """Objects the garbage collector tracks, and FX generated sources, left in the process by
    making, running, reporting and dropping ``models`` models with ``make``."""
    from torch.fx.graph_module import _loader

    make()  # first-call caches
    gc.collect()
    objects, sources = len(gc.get_objects()), len(_loader.eval_cache)
    for _ in range(models):
        make()
    gc.collect()
    return len(gc.get_objects()) - objects, len(_loader.eval_cache) - sources


def test_transformed_models_leave_no_more_behind_than_fx_traces() -> None:
    """Transforming, running, reporting and dropping models keeps nothing of them (a
    process-wide table once kept an entry per layer for good), and FX keeps one generated source
    per transform, as per trace (three, before)."""
    x = torch.randn(8, 3, 6, 6)
    models: list[weakref.ref[nn.Module]] = []

    def ghosted() -> None:
        model = _bn_net()
        gm = fxghost.transform(model, G)
        gm(x)
        fxghost.report(gm).table()
        models.extend((weakref.ref(model), weakref.ref(gm)))

    def traced() -> None:
        torch.fx.symbolic_trace(_bn_net())(x)

    n = 40
    kept, sources = _objects_kept(ghosted, n)
    kept -= len(models)  # the weak references are the test's own
    fx_kept, fx_sources = _objects_kept(traced, n)
    assert not [r for r in models if r() is not None], "a dropped model is still referenced"
    assert sources == fx_sources == n, (sources, fx_sources)
    # FX's per-source linecache entries are the objects both keep; a leak of one object per
    # model would exceed the slack.
    assert kept <= fx_kept + n // 4, (kept, fx_kept)
