"""The ensemble at inference: gate with the generalist, run only the active specialists, combine.

``Ensemble.load(RUN)`` validates every file it reads (checksums, groups, the generalist each
specialist was trained from) and loads specialists on demand, keeping at most ``cache_size`` in
memory. It reads the run under the run's lock, so it sees one state of it, and a specialist
loaded later must still be the file that state held (its checksum is the record's): a run
retrained meanwhile is one clear error, never a mix of two states.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import manifest
from .artifacts import load_generalist, load_specialists, load_weights
from .combination import Combination, load_combination, specialist_offsets
from .combiner import combine
from .errors import SpecialistsError
from .export import read_export, write_export
from .gating import ActivePairs, GroupIndex, gate
from .lock import run_lock
from .models import autocast_for, create_model, resolve_device
from .records import GeneralistRecord, SpecialistRecord
from .run import RunDir
from .transforms import BatchTransform, make_transforms, resize_images
from .trunk import (
    SharedTrunk,
    Traced,
    suffix_module,
    trace,
    traced,
    trunk_sha256,
    trunk_tensors,
    with_activations,
)

__all__ = ["Ensemble", "EnsembleOutput"]

log = logging.getLogger(__name__)


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float batch (B, C, H, W) at ``size`` x ``size`` as ``BatchTransform`` resizes (the
    resize is linear and the normalisation affine per channel, so their order does not matter)."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _row_major(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format] | None:
    """``x`` as a (len(x), -1) view of its rows and the memory format that view reads, for a
    channels-last or contiguous tensor (else None). Channels-last first: a one-channel batch is
    both, and its strides decide which convolution kernels run (channels-last ones were about
    20% faster for a small model on a CPU), so the gathered rows keep them."""
    width = x[0].numel() if len(x) else 0
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(len(x), width), torch.channels_last
    if x.is_contiguous():
        return x.reshape(len(x), width), torch.contiguous_format
    return None


def _take(parts: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (ascending) of the concatenation of ``parts``, without concatenating them:
    gathered straight into one tensor in the parts' memory layout."""
    views = [_row_major(p) for p in parts]
    layouts = {v[1] for v in views if v is not None}
    tracked = torch.is_grad_enabled() and any(p.requires_grad for p in parts)  # no out= then
    if None in views or len(layouts) != 1 or tracked:  # gather and concatenate
        if len(parts) == 1:
            return parts[0][rows]
        views = None
    ends = torch.tensor([len(p) for p in parts], device=rows.device).cumsum(0)
    which = torch.searchsorted(ends, rows, right=True)
    counts = torch.bincount(which, minlength=len(parts)).tolist()
    head = parts[0]
    if views is not None:
        out = torch.empty(
            (len(rows), *head.shape[1:]),
            dtype=head.dtype,
            device=head.device,
            memory_format=layouts.pop(),
        )
        flat = _row_major(out)[0]
    pieces, start = [], 0
    for i, (n, part) in enumerate(zip(counts, parts)):
        if n:
            local = rows[start : start + n] - (ends[i] - len(part))
            if views is not None:
                torch.index_select(views[i][0], 0, local, out=flat[start : start + n])
            else:
                pieces.append(part[local])
            start += n
    if views is not None:
        return out
    if not pieces:
        return head[rows]  # no rows
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _Stopwatch:
    """Adds the seconds its block took to ``into`` (synchronising CUDA before and after)."""

    def __init__(self, into: list[float], device: torch.device) -> None:
        self.into, self.cuda = into, device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.into.append(time.perf_counter() - self.start)


def _check_calibrated_on(
    comb: Combination,
    records: list[SpecialistRecord],
    path: Path,
    root: Path,
    variant: str | None,
) -> None:
    """A combination chosen for other specialists (some retrained since: a training stopped
    before its calibration) would score a state the run never had: one line saying what to do."""
    chosen_for = comb.chosen_on.get("specialists_sha256")
    if not chosen_for:  # chosen before the checksums were recorded, or not calibrated
        return
    changed = [r.id for r in records if chosen_for.get(str(r.id)) != r.weights_sha256]
    if changed or len(chosen_for) != len(records):
        which = f"specialist {changed[0]} changed" if changed else "the groups changed"
        fix = f"specialists controls {root}" if variant else f"specialists calibrate {root}"
        raise SpecialistsError(
            f"{path}: chosen for other specialists ({which} since); run `{fix}` to choose again"
        )


class EnsembleOutput:
    """Probabilities of one batch: ``q`` (combined), ``p_g`` (generalist), and which specialists
    were consulted for each example."""

    def __init__(self, q: np.ndarray, p_g: np.ndarray, consulted: list[list[int]]) -> None:
        self.q, self.p_g, self.consulted = q, p_g, consulted


class Ensemble(nn.Module):
    """A generalist, its specialists and the KL combiner, as one ``nn.Module``.

    ``forward`` takes a float batch (B, C, H, W) normalised as ``preprocess`` makes it and
    returns the combined log-probabilities (B, K); ``.to()``, ``.eval()`` and ``torch.compile``
    work as on any module. The numpy side (``predict_proba``, ``run_batch``) takes uint8 images
    (N, H, W, C). Specialists are loaded on first use (at most ``cache_size`` kept) onto the
    generalist's device. Every member always stays in eval mode: an ensemble is for inference
    (``specialists distill`` makes a trainable student of it).
    """

    def __init__(
        self,
        generalist: nn.Module,
        record: GeneralistRecord,
        specialists: list[SpecialistRecord],
        *,
        generalist_weights: Path | None = None,
        specialist_weights: dict[int, Path],
        top_n: int | None = None,
        cache_size: int | None = None,
        batch_size: int = 512,
        combination: Combination | None = None,
        run: RunDir | None = None,
        shared_trunk: bool = True,
        wave_bytes: int = 256 << 20,
        amp: str = "auto",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        comb = combination or Combination()
        if top_n is not None:
            comb = replace(comb, top_n=top_n)
        self.combination = comb
        self.run, self.generalist, self.record = run, generalist.eval(), record
        self.all_specialists = specialists
        keep = None if comb.keep is None else set(comb.keep)
        self.specialists = [s for s in specialists if keep is None or s.id in keep]
        self.generalist_weights = generalist_weights  # its file, for `specialists export`
        self.specialist_weights = dict(specialist_weights)
        self.generalist.requires_grad_(False)
        self.top_n, self.batch_size = comb.top_n, batch_size
        self.wave_bytes = wave_bytes
        self.amp = amp
        self.compiled = compile  # torch.compile each member on first use, with these options
        self.compile_options: dict = {"dynamic": True}  # row counts vary from batch to batch
        # NHWC memory layout for the members and their inputs: faster convolutions on some
        # hardware (on a CPU it depends on the model and the batch size: measure)
        self.channels_last = channels_last
        if channels_last:
            self.generalist.to(memory_format=torch.channels_last)
        self.cache_size = cache_size
        device = self.device
        self.groups = GroupIndex.from_lists(
            [s.classes for s in self.specialists], n_classes=record.n_classes
        ).to(device)
        self.offsets = [
            torch.tensor(specialist_offsets(s, comb.correction), dtype=torch.float32, device=device)
            for s in self.specialists
        ]
        self.spec_weights = [comb.spec_weight] * len(self.specialists)
        self.transform = make_transforms(record)[1]
        self._transforms = {record.input_size: self.transform}
        # the side images must have at least: every consulted model resizes from them
        self.input_size = max([record.input_size] + [s.size(record) for s in self.specialists])
        self.loaded = nn.ModuleDict()  # specialist id (str) -> model, least recently used first
        self._clock: dict[str, list[float]] | None = None  # stage -> seconds, while profiling
        # the generalist's trace and, made from it on first use, the generalist returning the
        # activations specialists start from; its traced graph alone ("plain"). A plain dict:
        # they share the generalist's layers, so must not be registered as second submodules
        self._runner: dict[str, nn.Module] = {}
        # specialist index -> the generalist's stages it runs from (checked against the
        # generalist here, and against its own file when it is loaded)
        self.trunks: dict[int, SharedTrunk] = self._check_trunks() if shared_trunk else {}
        self._trunk_checked: set[int] = set()  # specialists whose own trunk was checked
        self.eval()

    def _check_trunks(self) -> dict[int, SharedTrunk]:
        """The specialists that share the generalist's first stages, each checked: the
        generalist's tensors up to the recorded cut must hash to the recorded checksum (a
        generalist changed since is one clear error, never an answer from another trunk)."""
        shared = {
            m: t
            for m, s in enumerate(self.specialists)
            if (t := SharedTrunk.from_dict(s.shared_trunk)) is not None
            and s.architecture == self.record.architecture
            and s.size(self.record) == self.record.input_size
        }
        if not shared:
            return {}
        graph = trace(self.generalist)
        if graph is None:
            log.warning("%s cannot be traced: each specialist runs whole", self.record.architecture)
            return {}
        self._runner["trace"] = graph  # the trunk runner is made from it on first use
        state = self.generalist.state_dict()
        hashes: dict[str, tuple[int, str] | None] = {}
        for m, t in list(shared.items()):
            if t.cut not in hashes:
                try:
                    names = trunk_tensors(graph, t.cut)
                    hashes[t.cut] = (len(names), trunk_sha256(state, names))
                except (SpecialistsError, KeyError):  # no such activation, or tensor, here
                    hashes[t.cut] = None
            rec = self.specialists[m]
            found = hashes[t.cut]
            if found is None or found[0] != t.n_tensors:
                # the cut names another place of the graph here (a torch or timm version that
                # traces differently): nothing to compare, and running whole is always right
                log.warning(
                    "specialist %d: its shared stages (up to %r) are not found in this trace of "
                    "the generalist; it runs whole",
                    rec.id,
                    t.cut,
                )
                del shared[m]
            elif found[1] != t.sha256:
                raise SpecialistsError(
                    f"{self.specialist_weights[rec.id]}: specialist {rec.id} was trained on the "
                    f"generalist's stages up to {t.cut!r} (sha256 {t.sha256[:12]}), but this "
                    f"generalist's differ (sha256 {found[1][:12]}): retrain the specialists for it"
                )
        return shared

    def _generalist_with_trunks(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The generalist's logits and the activations the sharing specialists start from."""
        if not self.trunks:
            return self._plain_generalist(x), {}
        if "trunk" not in self._runner:
            cuts = {t.cut for t in self.trunks.values()}
            graph = self._runner.pop("trace", None)  # traced at load, unless moved since
            runner = with_activations(self.generalist, cuts, graph)
            self._runner["trunk"] = self._compiled(runner)
        return self._runner["trunk"](x)

    def _plain_generalist(self, x: torch.Tensor) -> torch.Tensor:
        """The generalist's logits, from its traced graph (``traced``) where fx traces it."""
        if "plain" not in self._runner:
            self._runner["plain"] = self._compiled(trace(self.generalist) or self.generalist)
        return self._runner["plain"](x)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the members' memory layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _compiled(self, module: nn.Module) -> nn.Module:
        """``module`` under ``torch.compile`` when the ensemble compiles, else itself."""
        return torch.compile(module, **self.compile_options) if self.compiled else module

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        device: str = "auto",
        *,
        top_n: int | None = None,
        cache_size: int | None = None,
        variant: str | None = None,
        combination: Combination | None = None,
        shared_trunk: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        amp: str = "auto",
    ) -> Ensemble:
        """Load a run's ensemble, validating every file; ``variant`` (e.g. ``controls/random``)
        reads the groups and specialists from that subfolder instead.

        The combination is ``combination`` if given, else the one calibrated on validation
        (``ensemble.json``, see :mod:`specialists.calibrate`), else the paper's (top-1 gating,
        equal weights); ``top_n`` overrides its gating width. Specialists that kept the
        generalist's first stages run from its activations (``shared_trunk``; off: each runs
        whole, the same answers up to float rounding, slower). ``compile``: ``torch.compile``
        each member on first use (minutes of compiling once, then faster batches).
        ``channels_last``: the members and their inputs in NHWC layout. ``amp``: mixed
        precision on CUDA (auto: bf16 where supported; bf16, fp16, off); nothing on a CPU."""
        run = RunDir.of(run_dir)
        run.require_generalist()  # never a lock file in a folder that is not a run
        with run_lock(run.root, "reading the ensemble", reader=True):
            generalist, record = load_generalist(run, resolve_device(device))
            paths = run.ensemble(variant)
            if top_n is not None and not 1 <= top_n <= record.n_classes:
                raise SpecialistsError(f"--top-n {top_n}: must be between 1 and {record.n_classes}")
            records = load_specialists(run, record, variant=variant)
            if combination is None:
                if paths.combination.is_file():
                    manifest.verify(run.root, paths.combination)
                combination = load_combination(paths.combination) or Combination()
                _check_calibrated_on(combination, records, paths.combination, run.root, variant)
        return cls(
            generalist,
            record,
            records,
            generalist_weights=run.generalist_weights,
            specialist_weights={r.id: paths.specialist(r.id).weights for r in records},
            top_n=top_n,
            cache_size=cache_size,
            combination=combination,
            run=run,
            shared_trunk=shared_trunk,
            compile=compile,
            channels_last=channels_last,
            amp=amp,
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str = "auto",
        *,
        top_n: int | None = None,
        cache_size: int | None = None,
        shared_trunk: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        amp: str = "auto",
    ) -> Ensemble:
        """Load an ensemble written by ``specialists export`` (see :mod:`specialists.export`):
        no run directory needed, every file checked against the checksums in its JSON."""
        parts = read_export(folder, resolve_device(device))
        if top_n is not None and not 1 <= top_n <= parts.record.n_classes:
            raise SpecialistsError(
                f"--top-n {top_n}: must be between 1 and {parts.record.n_classes}"
            )
        return cls(
            parts.generalist,
            parts.record,
            parts.specialists,
            generalist_weights=parts.generalist_weights,
            specialist_weights=parts.specialist_weights,
            top_n=top_n,
            cache_size=cache_size,
            combination=parts.combination,
            shared_trunk=shared_trunk,
            compile=compile,
            channels_last=channels_last,
            amp=amp,
        )

    def export(self, out: str | Path, *, onnx: bool = False, force: bool = False) -> dict:
        """Write this ensemble to the folder ``out`` for :meth:`from_pretrained` (see
        :mod:`specialists.export`): every consulted member's weights, one JSON, and with
        ``onnx`` each member as ONNX checked with onnxruntime. Returns the JSON written."""
        if self.generalist_weights is None:
            raise SpecialistsError("this ensemble was built without its generalist's file")
        source = "" if self.run is None else str(self.run.root)
        return write_export(self, out, onnx=onnx, force=force, source=source)

    # -- the module ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the ensemble runs: the generalist's device (``.to()`` moves everything)."""
        return next(self.generalist.parameters()).device

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .cpu() all come through here
        super()._apply(fn, *args, **kwargs)
        self._runner.clear()  # traced again from the moved generalist
        device = self.device
        self.groups = self.groups.to(device)
        self.offsets = [o.to(device) for o in self.offsets]
        return self

    def train(self, mode: bool = True) -> Ensemble:
        """Sets the flag only: every member stays in eval mode (batch norm and dropout as at
        inference), for an ensemble is not trained as a whole."""
        super().train(mode)
        for module in self.children():
            module.eval()
        return self

    @property
    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """Mixed precision on CUDA (``amp``: auto, bf16, fp16, off), nothing on the CPU."""
        return autocast_for(self.device, self.amp)[0]

    @property
    def mixed_sizes(self) -> bool:
        """Whether some specialist takes another input size than the generalist."""
        return self.input_size != self.record.input_size

    @property
    def data_size(self) -> int | None:
        """The size to read a data source at (``load_data(..., min_size=)``): the largest input
        size when some specialist has its own, else None (the data's own size)."""
        return self.input_size if self.mixed_sizes else None

    def fit_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` as the ensemble takes them: unchanged when large enough; when no specialist
        has its own size, images smaller than the generalist's input (data stored below it) are
        resized up to it, as its training transform did."""
        if not self.mixed_sizes and min(images.shape[1:3]) < self.input_size:
            return resize_images(images, self.input_size)
        return images

    def transform_for(self, rec: SpecialistRecord) -> BatchTransform:
        """uint8 images (at any size) -> the normalised input of ``rec``'s model at its size,
        resized exactly as in training."""
        size = rec.size(self.record)
        if size not in self._transforms:
            r = self.record
            self._transforms[size] = BatchTransform(r.mean, r.std, size)
        return self._transforms[size]

    def specialist(self, m: int) -> nn.Module:
        """What inference runs for the ``m``-th active specialist, loaded on first use: its
        model, or, when it shares the generalist's first stages, only its own stages (taking the
        shared activation). The least recently used is evicted when the cache is full."""
        rec = self.specialists[m]
        key = str(rec.id)
        if key in self.loaded:
            module = self.loaded.pop(key)  # to the end: most recently used
        else:
            module = self._build(rec)
            trunk = self.trunks.get(m)
            if trunk is not None:
                graph = trace(module)
                if rec.id not in self._trunk_checked:  # its file's checksum is checked anyway
                    self._check_own_trunk(graph, module, rec, trunk)
                    self._trunk_checked.add(rec.id)
                module = suffix_module(module, trunk.cut, graph).to(self.device).eval()
            else:
                module = traced(module)
            module = self._compiled(module)
        self.loaded[key] = module
        if self.cache_size is not None and len(self.loaded) > self.cache_size:
            del self.loaded[next(iter(self.loaded))]
        return module

    def load_specialist(self, rec: SpecialistRecord) -> nn.Module:
        """Specialist ``rec``'s whole model (taking the images), cached when inference runs it
        whole."""
        m = next((i for i, s in enumerate(self.specialists) if s.id == rec.id), None)
        if m is None or m in self.trunks:
            return self._build(rec)
        module = self.specialist(m)
        module = getattr(module, "_orig_mod", module)  # not the compiled wrapper
        return module.model if isinstance(module, Traced) else module  # nor the traced graph

    def _build(self, rec: SpecialistRecord) -> nn.Module:
        n_out = len(rec.classes) + 1
        size = rec.size(self.record)
        with torch.inference_mode(False):  # ordinary tensors, even when first used in inference
            model = create_model(rec.architecture, n_out, self.record.in_chans, size)
            load_weights(
                model,
                self.specialist_weights[rec.id],
                f"a {rec.architecture} with {n_out} outputs at {size} px",
                sha256=rec.weights_sha256,  # the file the ensemble was loaded with, not a newer one
            )
            model.to(self.device).eval().requires_grad_(False)
            if self.channels_last:
                model.to(memory_format=torch.channels_last)
        return model

    def _check_own_trunk(
        self, graph: nn.Module | None, model: nn.Module, rec: SpecialistRecord, t: SharedTrunk
    ) -> None:
        """The specialist's own copy of the shared stages (``graph``: its trace) must be what
        its record says."""
        names = [] if graph is None else trunk_tensors(graph, t.cut)
        if (len(names), trunk_sha256(model.state_dict(), names)) != (t.n_tensors, t.sha256):
            raise SpecialistsError(
                f"{self.specialist_weights[rec.id]}: its stages up to {t.cut!r} are not the ones "
                "its record shares with the generalist; retrain the specialists"
            )

    # -- inference -------------------------------------------------------------------------------

    def check_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``images`` as a uint8 (N, H, W, C) tensor with H and W at least the largest input size
        of the ensemble's models (each resizes from them to its own), or a clear error."""
        r = self.record
        with warnings.catch_warnings():  # read-only (memory-mapped) arrays: never written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[-1] != r.in_chans or x.dtype != torch.uint8:
            raise SpecialistsError(
                f"expected uint8 images of shape (N, H, W, {r.in_chans}), got {x.dtype} {tuple(x.shape)}"
            )
        if min(x.shape[1:3]) < self.input_size:
            if self.mixed_sizes:
                who = next(s for s in self.specialists if s.size(r) == self.input_size)
                need = f"specialist {who.id} takes {self.input_size} px inputs"
            else:
                need = f"the generalist takes {self.input_size} px inputs"
            raise SpecialistsError(
                f"images are {x.shape[1]}x{x.shape[2]} but {need}; give images of at least "
                f"{self.input_size} px (never upsampled: resize from the originals)"
            )
        return x

    @torch.inference_mode()
    def generalist_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = self.check_images(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            with self._autocast():
                batch = self.transform(x[i : i + self.batch_size].to(self.device))
                logits = self._plain_generalist(self._layout(batch))
            out.append(torch.softmax(logits.float(), 1).cpu())
        return torch.cat(out).numpy()

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, C) -> the float batch ``forward`` takes: (N, C, S, S) at the
        ensemble's largest input size S, normalised with the generalist's mean and std."""
        x = self.check_images(images).to(self.device)
        if self.input_size not in self._transforms:
            r = self.record
            self._transforms[self.input_size] = BatchTransform(r.mean, r.std, self.input_size)
        return self._transforms[self.input_size](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Combined log-probabilities (B, K) of a float batch (B, C, H, W) normalised as
        ``preprocess`` makes it, with H and W at least ``input_size``: each member resizes it
        to its own input size (bilinear, antialiased, as in training). At exactly
        ``input_size`` this equals ``run_batch``; from larger inputs, members that take
        another size resize twice (to ``input_size`` in ``preprocess``, then to theirs) and
        differ from ``run_batch`` by that second resampling."""
        r = self.record
        if x.ndim != 4 or x.shape[1] != r.in_chans or not x.is_floating_point():
            raise SpecialistsError(
                f"expected a float batch of shape (B, {r.in_chans}, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.input_size:
            raise SpecialistsError(
                f"inputs are {x.shape[-2]}x{x.shape[-1]} but the ensemble takes {self.input_size} px"
            )
        q, _, _ = self._combine(
            [_resized(x, r.input_size)], lambda rec, rows: _resized(x[rows], rec.size(r))
        )
        return torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))

    @torch.no_grad()  # not inference mode: a distillation teacher's q is a loss target
    def combine_transformed(
        self, x: torch.Tensor, raw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, ActivePairs]:
        """q (B, K), p_g (B, K) and the active pairs for a batch already transformed as
        ``self.transform`` does (on the ensemble's device): the generalist once, each active
        specialist only on the rows that activate it, then the combiner. A distillation teacher
        calls this on the student's own augmented batch. Specialists with their own input size
        need ``raw``, the uint8 batch ``x`` was made from, to resize from."""
        return self._combine([x], self._view([x], raw))

    def _view(
        self, xs: list[torch.Tensor], raw: torch.Tensor | None
    ) -> Callable[[SpecialistRecord, torch.Tensor], torch.Tensor]:
        """Specialist ``rec``'s input for ``rows``: rows of ``xs`` (the generalist's view, in
        batches) at the generalist's size, else resized from ``raw`` (the uint8 images) to its
        own."""

        def view(rec: SpecialistRecord, rows: torch.Tensor) -> torch.Tensor:
            if rec.size(self.record) == self.record.input_size:
                return _take(xs, rows)
            if raw is None:
                raise SpecialistsError(
                    f"specialist {rec.id} takes {rec.size(self.record)} px inputs: it needs "
                    "the untransformed images, not the generalist's view"
                )
            return self._layout(self.transform_for(rec)(raw[rows]))

        return view

    def _combine(
        self,
        xs: list[torch.Tensor],
        view: Callable[[SpecialistRecord, torch.Tensor], torch.Tensor],
        chunk: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, ActivePairs]:
        """The generalist on each batch of ``xs`` (its inputs, in row order), the gate, each
        active specialist on ``view(record, rows)`` (its input for those rows) or on the
        generalist's activation it continues from, the combiner. Each specialist's rows are
        pooled over all of ``xs`` and run ``chunk`` at a time (default: all at once)."""
        autocast = self._autocast
        shared: dict[str, list[torch.Tensor]] = {}
        logits = []
        with self._stage("generalist"), autocast():
            for x in xs:
                out, acts = self._generalist_with_trunks(x)
                logits.append(out.float())
                for cut, a in acts.items():
                    shared.setdefault(cut, []).append(a)
            p_g = torch.softmax(torch.cat(logits) if len(logits) > 1 else logits[0], 1)
        with self._stage("gating"):
            pairs, per_specialist = self._route(p_g)
        outputs = []
        step = chunk or max(len(p_g), 1)
        for m, rows in enumerate(per_specialist):
            if not len(rows):
                continue
            rec, trunk = self.specialists[m], self.trunks.get(m)
            for i in range(0, len(rows), step):
                part = rows[i : i + step]
                with self._stage(f"specialist {rec.id} input"):
                    own = trunk is None
                    inputs = view(rec, part) if own else _take(shared[trunk.cut], part)
                with self._stage(f"specialist {rec.id}"), autocast():
                    out = self.specialist(m)(inputs).float() + self.offsets[m]
                    outputs.append(torch.softmax(out, 1))
        with self._stage("combiner"):
            q = self._fuse(p_g, outputs, pairs)
        return q, p_g, pairs

    @torch.compiler.disable
    def _stage(self, name: str):
        """Time the block as stage ``name`` while :meth:`profile` runs (else nothing)."""
        if self._clock is None:
            return contextlib.nullcontext()
        return _Stopwatch(self._clock.setdefault(name, []), self.device)

    # The routing and the combiner depend on the data (which rows, how many EM steps): under
    # torch.compile they run eagerly, and the members' forward passes are what gets compiled.
    @torch.compiler.disable
    def _route(self, p_g: torch.Tensor) -> tuple[ActivePairs, list[torch.Tensor]]:
        pairs = gate(p_g, self.groups, self.top_n, self.combination.confidence)
        return pairs, pairs.per_specialist(len(self.specialists))

    @torch.compiler.disable
    def _fuse(
        self, p_g: torch.Tensor, outputs: list[torch.Tensor], pairs: ActivePairs
    ) -> torch.Tensor:
        if not outputs:
            return p_g
        return combine(p_g, outputs, pairs, self.groups, spec_weights=self.spec_weights)

    def wave_size(self, n_images: int) -> int:
        """How many images ``run_batch`` routes together: enough that each consulted specialist
        runs on about a full batch of rows (``batch_size`` times the active specialists), within
        ``wave_bytes`` of inputs held on the device, and at least one batch."""
        r = self.record
        # the inputs, and about as much again for each activation held for the specialists
        cuts = len({t.cut for t in self.trunks.values()})
        per_image = 4 * r.in_chans * self.input_size**2 * (1 + cuts)
        if self.mixed_sizes:
            per_image += r.in_chans * self.input_size**2  # the uint8 images, to resize from
        wave = min(self.batch_size * max(1, len(self.specialists)), self.wave_bytes // per_image)
        return max(1, min(n_images, max(self.batch_size, wave)))

    @torch.inference_mode()
    def run_batch(self, images: np.ndarray | torch.Tensor) -> EnsembleOutput:
        """The generalist on every image, the gate, each active specialist only on the inputs
        that activate it, the combiner. Images are routed in waves (``wave_size``): each
        specialist's rows are pooled over the wave and run in full batches, not in a sliver
        of every batch."""
        x_all = self.check_images(images)
        if len(x_all) == 0:
            empty = np.zeros((0, self.record.n_classes), dtype=np.float32)
            return EnsembleOutput(empty, empty.copy(), [])
        qs, pgs, consulted = [], [], []
        wave = self.wave_size(len(x_all))
        for start in range(0, len(x_all), wave):
            with self._stage("input to device, transform"):
                raw = x_all[start : start + wave].to(self.device)
                bs = self.batch_size
                xs = [self._layout(self.transform(raw[i : i + bs])) for i in range(0, len(raw), bs)]
            q, p_g, pairs = self._combine(xs, self._view(xs, raw), bs)
            with self._stage("outputs to host"):
                by_row: list[list[int]] = [[] for _ in range(len(raw))]
                for r, s in zip(pairs.rows.tolist(), pairs.specs.tolist()):
                    by_row[r].append(self.specialists[s].id)
                qs.append(q.cpu())
                pgs.append(p_g.cpu())
                consulted.extend(by_row)
        if len(qs) == 1:  # one wave: no copy
            return EnsembleOutput(qs[0].numpy(), pgs[0].numpy(), consulted)
        return EnsembleOutput(torch.cat(qs).numpy(), torch.cat(pgs).numpy(), consulted)

    def profile(self, images: np.ndarray | torch.Tensor, repeats: int = 3) -> dict[str, float]:
        """Where the time of ``run_batch(images)`` goes: seconds per stage (the generalist, the
        gating, each consulted specialist's input and forward pass, the combiner, the copies),
        the median over ``repeats`` runs after a warm-up, plus ``"total"``."""
        self.run_batch(images)  # warm-up: specialists loaded, kernels chosen
        totals: list[float] = []
        clock: dict[str, list[float]] = {}
        try:
            for _ in range(repeats):
                self._clock = {}
                start = time.perf_counter()
                self.run_batch(images)
                totals.append(time.perf_counter() - start)
                for name, seconds in self._clock.items():
                    clock.setdefault(name, []).append(sum(seconds))
        finally:
            self._clock = None
        out = {name: float(np.median(v + [0.0] * (repeats - len(v)))) for name, v in clock.items()}
        out["total"] = float(np.median(totals))
        return out

    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Combined probabilities (N, K) for uint8 images (N, H, W, C) of at least
        ``input_size`` pixels."""
        return self.run_batch(images).q

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.predict_proba(images).argmax(1)

    def throughput(self, images: np.ndarray, repeats: int = 1) -> tuple[float, float]:
        """Images per second of the generalist alone and of the whole ensemble, on ``images``."""
        self.generalist_proba(images[: self.batch_size])  # warm up both paths
        self.run_batch(images[: self.batch_size])
        t = time.perf_counter()
        for _ in range(repeats):
            self.generalist_proba(images)
        g = repeats * len(images) / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(repeats):
            self.run_batch(images)
        return g, repeats * len(images) / (time.perf_counter() - t)

    def best_throughput(self, images: np.ndarray, tries: int = 2) -> tuple[float, float]:
        """``throughput`` timed ``tries`` times back to back, the best of each (a single pass of
        a small model swings by tens of percent with whatever else runs)."""
        times = [self.throughput(images) for _ in range(tries)]
        return max(g for g, _ in times), max(e for _, e in times)
