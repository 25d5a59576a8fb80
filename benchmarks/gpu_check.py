"""One prepared GPU check (issues 7 and 15): every speed figure issue 7 left unmeasured, in one run
that fits a lent GPU's few minutes and writes what it has after every row.

    python benchmarks/gpu_check.py                          # on the GPU: about 4-5 minutes (estimate), 8 at most
    python benchmarks/gpu_check.py --smoke --out /tmp/gc    # CPU, `tiny`, tiny images: about 30 s (CI runs this)
    python benchmarks/gpu_check.py --list                    # the rows it would run, and exit
    python benchmarks/gpu_check.py --rows 'adaptclip*,eval*' # rerun a subset (globs or prefixes of row ids)
    python benchmarks/gpu_check.py --device cpu --backbone tiny --image-size 64   # CPU rehearsal of the GPU profile

Weights are random (pretrained=None) everywhere: the compute is that of the real architectures,
and nothing is downloaded (the GPU machine has no internet). Backbones and input sizes are each
method's defaults (its paper's): ViT-L-14-336 at 518 px for AdaptCLIP, AnomalyCLIP and
TokenCLIP, ViT-B-16-plus-240 at 240 px for AnoCLIP and WinCLIP; other registered methods their
own ``default_backbone`` and size. ``--smoke`` replaces them all by the ``tiny`` backbone at 64 px,
runs fp32 at batch 2 only and leaves out anoclip-22views and winclip (rows that differ from
others only in options), to stay within seconds on CI's 2 cores.

Rows (id pattern -> what is measured):

  backbone:<arch>@<px>/<dtype>/b<N>   the bare image-tower forward (``Backbone.encode_image``) of each
                                      backbone the methods use: ms/image, images/s, achieved
                                      TFLOP/s (analytic FLOPs, clipad.eval.speed.vit_forward_flops)
  <method>[-<k>shot]/<dtype>/b<N>     ``Detector.score_normalized`` on a device-resident, normalised
                                      batch of N, timed in turns with the bare tower on the same batch
                                      (clipad.eval.speed.measure_interleaved): ms/image, images/s,
                                      "x bare" (method time / bare time), TFLOP/s of the tower FLOPs.
                                      Methods, in order: adaptclip-0shot, adaptclip-1shot, anomalyclip,
                                      tokenclip (ot_check_every=10, docs/speed.md's GPU setting),
                                      anoclip (augment_views=false: issue 7's target setting),
                                      anoclip-tta (the same with tta=true, 5 steps), then extras:
                                      anoclip-22views (its default), winclip-0shot/-1shot, and every
                                      other registered method (clipad.list_methods(): e.g. anomalydino
                                      1-shot, musc on sets of 8 and 32 images, adaclip), if present
  eval:adaptclip-0shot                ``clipad eval``'s pipeline (clipad.eval.run: decode with DataLoader
                                      workers, resize, score, maps, all metrics, report files) on one
                                      generated MVTec-sized class (115 test images at 1024 px with
                                      masks, clipad.data.synthetic.write_mvtec_tree, written to a temp
                                      dir in a background process while the GPU rows run): images/s,
                                      model built beforehand (not timed)
  predict:api                         ``Detector.predict`` on the same 115 file paths, batch 32, the
                                      model built beforehand: decode, resize, score, maps at image size
                                      to the host, nothing written (the work of one Ray actor): images/s
  predict:single                      the ``clipad predict`` command in this process on the same 115
                                      images (model build, decode, score, scores.csv, a heatmap PNG per
                                      image at 1024 px, which costs CPU time): images/s
  predict:ray                         clipad.distributed.predict with 1 actor (1 GPU; 0 on CPU) on the
                                      same images: its own images/s and seconds, and the wall time of
                                      the call (Ray start and model build included); "skipped: <reason>"
                                      when ray or clipad.distributed is missing

dtypes: bf16 (autocast; heads stay fp32) and fp32 (torch's default: TF32 matmuls off); batches 1
and 32. Timing: device-synchronised, warm-up calls excluded, median of --repeats timed calls
(4x as many for calls under 0.1 s; fewer when a row would pass its --row-budget-s; the count
used is recorded). Peak memory: on CUDA torch.cuda.max_memory_allocated over the row (reset
before it), with the memory already resident before the row next to it; on CPU the process's
peak RSS. A row that fails is recorded with its error and the run goes on; rows not started when
--budget-s is spent are recorded as skipped, and a row or model build still running then is
stopped at most 45 s later (SIGALRM), so that the GPU run ends within 8 minutes. JSON (machine facts, every row) and Markdown are rewritten after every row to --out.
Rows that issue 7 set targets for (AdaptCLIP/AnomalyCLIP/TokenCLIP <= 3.5 ms/image at bf16 batch
32, AdaptCLIP 1-shot <= 4.0, AnoCLIP <= 0.6 and with TTA <= 1.5, x bare <= 1.3, eval >= 200
images/s) say whether each is met (not under --smoke).
Exit code: 0; 1 if a row failed (its error is in the files); 2 for bad arguments; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import inspect
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
OVERRUN_S = 45.0  # how far past --budget-s a row or build already running may go before it is stopped


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Profile:
    """What a run measures at: the GPU profile, or --smoke's tiny CPU one."""

    device: str
    backbone: str | None  # None: each method's paper backbone
    image_size: int | None  # None: each method's default
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    batches: tuple[int, ...] = (1, 32)
    set_batches: tuple[int, ...] = (8, 32)  # methods that score a batch as one set (MuSc)
    warmup: int = 2
    repeats: int = 5
    row_budget_s: float = 40.0
    eval_good: int = 40
    eval_bad: int = 75
    eval_px: int = 1024
    eval_train: int = 8
    eval_batch: int = 32
    eval_workers: int = 8
    tta_steps: int | None = None  # None: the method's default (5)
    variants: bool = True  # AnoCLIP's 22 views and WinCLIP: extras whose rows differ only in options


def gpu_profile(device: str) -> Profile:
    return Profile(device=device, backbone=None, image_size=None,
                   eval_workers=min(8, max(1, (os.cpu_count() or 2) - 2)))


def smoke_profile(device: str) -> Profile:
    # fp32 only and one batch size: the rows' code is the same for every dtype and batch, and CI's
    # 2 cores pay for each row
    return Profile(device=device, backbone="tiny", image_size=64, dtypes=("fp32",), batches=(2,), set_batches=(8,),
                   warmup=1, repeats=2, row_budget_s=10.0, eval_good=4, eval_bad=4, eval_px=96,
                   eval_train=2, eval_batch=4, eval_workers=1, tta_steps=1, variants=False)


@dataclass(frozen=True)
class MethodConfig:
    """One detector to build and the rows it gives."""

    label: str
    method: str
    shots: tuple[int, ...] = (0,)
    options: dict[str, Any] = field(default_factory=dict)
    set_scoring: bool = False  # a batch is scored as one set (MuSc): batches are set sizes
    extra: bool = False  # measured after the core rows and the pipeline rows


CORE_LABELS = ("adaptclip", "anomalyclip", "tokenclip", "anoclip", "winclip")
# what issue 7's targets name, in priority order (the global budget cuts from the end)
CORE = (
    MethodConfig("adaptclip", "adaptclip", shots=(0, 1)),
    MethodConfig("anomalyclip", "anomalyclip"),
    MethodConfig("tokenclip", "tokenclip", options={"ot_check_every": 10}),
    MethodConfig("anoclip", "anoclip", options={"augment_views": False}),
    MethodConfig("anoclip-tta", "anoclip", options={"augment_views": False, "tta": True}),
)
# issue 7's targets (GPU profile only): row id -> [(figure, "<=" or ">=", bound)]
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "adaptclip-0shot/bf16/b32": [("ms_per_image", "<=", 3.5), ("x_bare", "<=", 1.3)],
    "adaptclip-1shot/bf16/b32": [("ms_per_image", "<=", 4.0), ("x_bare", "<=", 1.3)],
    "anomalyclip/bf16/b32": [("ms_per_image", "<=", 3.5), ("x_bare", "<=", 1.3)],
    "tokenclip/bf16/b32": [("ms_per_image", "<=", 3.5), ("x_bare", "<=", 1.3)],
    "anoclip/bf16/b32": [("ms_per_image", "<=", 0.6), ("x_bare", "<=", 1.3)],
    "anoclip-tta/bf16/b32": [("ms_per_image", "<=", 1.5)],
    "eval:adaptclip-0shot": [("images_per_s", ">=", 200.0)],
}


def check_targets(rid: str, figures: dict[str, Any]) -> dict[str, Any]:
    """``{"targets": "ms_per_image <= 3.5: met; ..."}`` for a row with issue 7 targets, else {}."""
    parts = []
    for key, op, bound in TARGETS.get(rid, []):
        value = figures.get(key)
        if value is None:
            continue
        met = value <= bound if op == "<=" else value >= bound
        parts.append(f"{key} {op} {bound:g}: {'met' if met else 'NOT met'} ({_fmt(float(value))})")
    return {"targets": "; ".join(parts)} if parts else {}


# known settings of methods being added (a name absent from the registry gives no rows)
KNOWN_EXTRAS = {
    "anomalydino": {"shots": (1,)},  # a memory bank of normal patches: few-shot only
    "musc": {"shots": (0,), "set_scoring": True},  # zero-shot by mutual scoring within a set
    "adaclip": {"shots": (0,)},
}


def method_configs(registered: list[str], variants: bool = True) -> list[MethodConfig]:
    from clipad.methods import get_method

    configs = [c for c in CORE if c.method in registered]
    if "anoclip" in registered and variants:
        configs.append(MethodConfig("anoclip-22views", "anoclip", extra=True))
    if "winclip" in registered and variants:
        configs.append(MethodConfig("winclip", "winclip", shots=(0, 1), extra=True))
    for name in registered:
        if name in CORE_LABELS:
            continue
        known = KNOWN_EXTRAS.get(name)
        if known is None:
            known = {"shots": (0, 1) if get_method(name).few_shot else (0,)}
        configs.append(MethodConfig(name, name, extra=True, **known))
    return configs


# --------------------------------------------------------------------------- rows


class Skip(Exception):
    """A row that cannot run here, with the reason (not an error)."""


class RowTimeout(Exception):
    pass


@dataclass
class Row:
    id: str
    kind: str
    info: dict[str, Any]
    run: Callable[[Any], dict[str, Any]]  # the group's built object -> figures


@dataclass
class Group:
    name: str
    build: Callable[[], Any]  # returns what the rows run on (a detector, or None)
    rows: list[Row]


def row_id(cfg: MethodConfig, shots: int, dtype: str, batch: int, few_shot: bool) -> str:
    label = f"{cfg.label}-{shots}shot" if few_shot or len(cfg.shots) > 1 else cfg.label
    return f"{label}/{dtype}/b{batch}"


class Runner:
    """Runs the groups in order within the budgets; the record is rewritten after every row."""

    def __init__(self, args: argparse.Namespace, profile: Profile, record: dict[str, Any]) -> None:
        self.args = args
        self.profile = profile
        self.record = record
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.stem = "gpu_check_smoke" if args.smoke else "gpu_check"

    # -- budgets
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def global_left(self) -> float:
        return self.args.budget_s - self.elapsed()

    # -- output
    def write(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{self.stem}.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str))
        os.replace(tmp, self.out / f"{self.stem}.json")
        (self.out / f"{self.stem}.md").write_text(markdown(self.record))

    def add(self, row: Row, status: str, figures: dict[str, Any] | None = None, reason: str | None = None,
            seconds: float | None = None) -> None:
        entry = {"id": row.id, "kind": row.kind, **row.info, "status": status}
        if reason:
            entry["reason"] = reason
        if figures:
            entry.update(figures)
            if not self.args.smoke:
                entry.update(check_targets(row.id, figures))
        if seconds is not None:
            entry["row_s"] = round(seconds, 2)
        self.record["rows"].append(entry)
        self.write()
        shown = reason if reason else ", ".join(f"{k}={_fmt(v)}" for k, v in (figures or {}).items()
                                               if k in ("ms_per_image", "images_per_s", "x_bare", "peak_mb", "repeats"))
        print(f"[{self.elapsed():6.1f} s] {row.id}: {status}{': ' + shown if shown else ''}", flush=True)

    # -- running
    def run(self, groups: list[Group]) -> None:
        for g in groups:
            if not g.rows:
                continue
            if self.global_left() <= 0:
                for r in g.rows:
                    self.add(r, "skipped", reason=f"global budget (--budget-s {self.args.budget_s:g}) spent")
                continue
            try:
                t = time.perf_counter()
                limit = min(max(60.0, 3 * self.profile.row_budget_s), max(15.0, self.global_left() + OVERRUN_S))
                with watchdog(limit, "building " + g.name):
                    obj = g.build()
                self.record["builds"][g.name] = round(time.perf_counter() - t, 2)
            except Skip as exc:
                for r in g.rows:
                    self.add(r, "skipped", reason=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one failed build must not end the check
                traceback.print_exc()
                for r in g.rows:
                    self.add(r, "error", reason=f"build failed: {one_line(exc)}")
                free_device_memory()
                continue
            for r in g.rows:
                if self.global_left() <= 0:
                    self.add(r, "skipped", reason=f"global budget (--budget-s {self.args.budget_s:g}) spent")
                    continue
                t = time.perf_counter()
                try:
                    # no row runs on more than OVERRUN_S past the global budget (the GPU check
                    # must end within 8 minutes: 420 + 45 s + start-up)
                    limit = max(15.0, self.global_left() + OVERRUN_S)
                    if r.kind in ("method", "backbone"):
                        limit = min(limit, 3 * self.profile.row_budget_s + 20)
                    with watchdog(limit, r.id):
                        figures = r.run(obj)
                    self.add(r, "ok", figures, seconds=time.perf_counter() - t)
                except Skip as exc:
                    self.add(r, "skipped", reason=str(exc), seconds=time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001 - recorded; the next row runs
                    traceback.print_exc()
                    self.add(r, "error", reason=one_line(exc), seconds=time.perf_counter() - t)
                    free_device_memory()
            del obj
            free_device_memory()


@contextlib.contextmanager
def watchdog(seconds: float, what: str):
    """Raise RowTimeout in the main thread after ``seconds`` (SIGALRM; where there is none, no limit)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise RowTimeout(f"{what}: still running after {seconds:g} s; stopped")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- measurements


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> float | None:
    """Reset the peak counter; the memory resident now (MB, CUDA; None elsewhere)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return None


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def timed(runner: Runner, fns: list[Callable[[], Any]], device) -> tuple[list[float], int]:
    """Median wall seconds of each of ``fns`` (clipad.eval.speed.measure_interleaved), after
    ``warmup`` untimed rounds (at least one: it sizes the repeats); ``repeats`` timed rounds, 4x
    that for rounds under 0.1 s, lowered so that the row stays within its budget (>= 1)."""
    from clipad.eval.speed import measure_interleaved

    p = runner.profile
    t_start = time.perf_counter()
    round_s = 0.0
    for _ in range(max(1, p.warmup)):
        t = time.perf_counter()
        for fn in fns:
            fn()
        sync(device)
        round_s = time.perf_counter() - t
    avail = min(p.row_budget_s - (time.perf_counter() - t_start), runner.global_left() - 5.0)
    # short calls (batch 1 on a GPU) are noisier: up to 4x the repeats where a round takes < 0.1 s
    most = p.repeats if round_s >= 0.1 else 4 * p.repeats
    repeats = max(1, min(most, int(avail / max(round_s, 1e-6))))
    results = measure_interleaved(fns, device, repeats, 0)
    return [wall for wall, _ in results], repeats


def tower_flops(backbone, size: int) -> float | None:
    from clipad.eval.speed import vit_forward_flops

    try:
        return vit_forward_flops(backbone, size)
    except Exception:  # noqa: BLE001 - a tower this formula does not know: no TFLOP/s
        return None


def set_dtype(det, dtype: str) -> None:
    det.precision = "bf16" if dtype == "bf16" else "fp32"


def method_row(runner: Runner, cfg: MethodConfig, shots: int, dtype: str, batch: int) -> Callable[[Any], dict]:
    def run(det) -> dict[str, Any]:
        import torch

        dev = det.device
        set_dtype(det, dtype)
        size = det.image_size
        if shots:
            from clipad.errors import ClipadError

            try:
                det.set_reference(torch.rand(shots, 3, size, size, generator=torch.Generator().manual_seed(1)))
            except ClipadError as exc:
                raise Skip(f"{cfg.method} takes no {shots}-shot references: {one_line(exc)}") from None
        else:
            det.clear_reference()
        x = det.backbone.normalize(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev))
        resident = reset_peak(dev)

        def run_method():
            det.score_normalized(x, class_name="object")

        has_bare = hasattr(det.backbone, "encode_image")

        def run_bare():
            with torch.no_grad(), det.autocast():
                det.backbone.encode_image(x)

        try:
            (t_method, *rest), repeats = timed(runner, [run_method, run_bare] if has_bare else [run_method], dev)
        except Exception as exc:
            from clipad.errors import ClipadError

            if isinstance(exc, ClipadError) and (cfg.extra and shots == 0):
                raise Skip(f"{cfg.method} {shots}-shot: {one_line(exc)}") from None
            raise
        finally:
            if shots:
                det.clear_reference()
        flops = tower_flops(det.backbone, size)
        fig: dict[str, Any] = {
            "image_size": size, "ms_per_image": 1e3 * t_method / batch, "images_per_s": batch / t_method,
        }
        if rest:
            t_bare = rest[0]
            fig.update({"bare_ms_per_image": 1e3 * t_bare / batch, "x_bare": t_method / t_bare})
        if flops:
            fig["tflops"] = flops * batch / t_method / 1e12  # tower FLOPs only: a lower bound
        fig.update({"peak_mb": peak_mb(dev), "resident_mb": resident, "repeats": repeats})
        return fig

    return run


def backbone_row(runner: Runner, dtype: str, batch: int) -> Callable[[Any], dict]:
    def run(det) -> dict[str, Any]:
        import torch

        dev = det.device
        if not hasattr(det.backbone, "encode_image"):
            raise Skip(f"backbone {type(det.backbone).__name__} has no encode_image()")
        set_dtype(det, dtype)
        size = det.image_size
        x = det.backbone.normalize(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev))
        resident = reset_peak(dev)

        def run_bare():
            with torch.no_grad(), det.autocast():
                det.backbone.encode_image(x)

        (t,), repeats = timed(runner, [run_bare], dev)
        flops = tower_flops(det.backbone, size)
        fig: dict[str, Any] = {"image_size": size, "ms_per_image": 1e3 * t / batch, "images_per_s": batch / t}
        if flops:
            fig["tflops"] = flops * batch / t / 1e12
        fig.update({"peak_mb": peak_mb(dev), "resident_mb": resident, "repeats": repeats})
        return fig

    return run


def build_detector(method: str, profile: Profile, options: dict[str, Any]):
    import clipad

    opts = dict(options)
    if profile.image_size:
        opts["image_size"] = profile.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, once per detector
        return clipad.create_detector(method, backbone=profile.backbone, pretrained=None, device=profile.device, **opts)


# --------------------------------------------------------------------------- the pipeline rows


def _lower_priority() -> None:
    """In the data-writing child: nice 10 where the system allows it (a sandbox may not)."""
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass


class EvalData:
    """The generated MVTec-sized class, written by a background process (:meth:`start`, at the
    beginning of the run, so that it is ready by the pipeline rows)."""

    def __init__(self, profile: Profile, nice: bool = True) -> None:
        self.profile = profile
        self.nice = nice
        self.tmp = Path(tempfile.mkdtemp(prefix="clipad_gpu_check_"))
        self.root = self.tmp / "mvtec"
        self.proc: subprocess.Popen | None = None
        self.seconds: float | None = None
        self.done = False

    def start(self) -> None:
        profile, nice = self.profile, self.nice
        code = (
            "import sys, time, torch; torch.set_num_threads(2); t0 = time.perf_counter()\n"
            "from clipad.data.synthetic import write_mvtec_tree\n"
            f"write_mvtec_tree(sys.argv[1], ['synth00'], n_train={profile.eval_train}, n_good={profile.eval_good}, "
            f"n_bad={profile.eval_bad}, size={profile.eval_px})\n"
            "print(f'seconds {time.perf_counter() - t0:.3f}')\n"
        )
        env = dict(os.environ)
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.root)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     # on the GPU, below the timed rows' CPU side
                                     preexec_fn=_lower_priority if nice else None)

    def ready(self, timeout: float) -> Path:
        if self.done:
            return self.root
        if self.proc is None:
            self.start()
        try:
            out, _ = self.proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            raise Skip(f"the generated set was not written within {timeout:.0f} s") from None
        lines = (out or b"").decode(errors="replace").strip().splitlines() if out is not None else []
        if self.proc.returncode != 0:
            raise RuntimeError(f"generating the set failed: {(lines[-1:] or ['?'])[0][:200]}")
        if self.seconds is None and lines and lines[-1].startswith("seconds "):
            self.seconds = float(lines[-1].split()[1])  # the writing alone, in the background process
        self.done = True
        return self.root

    def test_files(self) -> list[str]:
        return sorted(str(p) for p in (self.root / "synth00" / "test").rglob("*.png"))

    def close(self) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def eval_row(runner: Runner, data: EvalData) -> Callable[[Any], dict]:
    def run(det) -> dict[str, Any]:
        from clipad.data import mvtec_dataset
        from clipad.eval.run import run as eval_run
        from clipad.eval.run import write_outputs

        p = runner.profile
        root = data.ready(min(120.0, runner.global_left()))
        det.precision = "auto"  # what `clipad eval` runs: bf16 on CUDA, fp32 on CPU
        dataset = mvtec_dataset(root)
        dev = det.device
        resident = reset_peak(dev)
        out = data.tmp / "eval_out"
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = eval_run(det, dataset, classes=None, shots=0, seed=0, eval_size=None, batch_size=p.eval_batch,
                              workers=p.eval_workers, protocol="anomalyclip", n_examples=3, quiet=True)
            t_run = time.perf_counter() - t
            write_outputs(result, out, {"method": det.name, "benchmark": "gpu_check"})
        seconds = time.perf_counter() - t
        n = sum(c.n_images for c in result.classes)
        if not n:
            raise RuntimeError(f"no image evaluated; failures: {result.failures[:2]}")
        return {"images": n, "image_px": p.eval_px, "seconds": seconds, "images_per_s": n / seconds,
                "run_s": t_run, "report_s": seconds - t_run, "failed": len(result.failures),
                "image_auroc": result.mean.get("image_auroc"), "batch": p.eval_batch, "workers": p.eval_workers,
                "dtype": "bf16" if dev.type == "cuda" else "fp32", "generate_s": data.seconds,
                "peak_mb": peak_mb(dev), "resident_mb": resident}

    return run


def predict_api_row(runner: Runner, data: EvalData) -> Callable[[Any], dict]:
    def run(det) -> dict[str, Any]:
        p = runner.profile
        data.ready(min(120.0, runner.global_left()))
        files = data.test_files()
        det.precision = "auto"
        dev = det.device
        resident = reset_peak(dev)
        t = time.perf_counter()
        pred = det.predict(files, batch_size=p.eval_batch)
        sync(dev)
        seconds = time.perf_counter() - t
        n = len(pred.image_scores)
        if n != len(files):
            raise RuntimeError(f"Detector.predict returned {n} scores for {len(files)} images")
        return {"images": n, "image_px": p.eval_px, "seconds": seconds, "images_per_s": n / seconds,
                "batch": p.eval_batch, "peak_mb": peak_mb(dev), "resident_mb": resident,
                "note": "Detector.predict on the file paths, model built beforehand: decode, resize, score, "
                        "maps at image size on the host; nothing written"}

    return run


def cli_model_args(profile: Profile, method: str) -> list[str]:
    argv = ["--method", method, "--pretrained", "none", "--device", profile.device]
    if profile.backbone:
        argv += ["--backbone", profile.backbone]
    if profile.image_size:
        argv += ["--image-size", str(profile.image_size)]
    return argv


def predict_single_row(runner: Runner, data: EvalData) -> Callable[[Any], dict]:
    def run(_) -> dict[str, Any]:
        from clipad.cli import main as clipad_main

        p = runner.profile
        data.ready(min(120.0, runner.global_left()))
        files = data.test_files()
        out = data.tmp / "predict_single"
        argv = ["predict", *files, *cli_model_args(p, "adaptclip"), "--batch-size", str(p.eval_batch),
                "--out", str(out), "--quiet"]
        t = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            rc = clipad_main(argv)
        seconds = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"clipad predict exited with {rc}")
        with open(out / "scores.csv") as fh:
            n = sum(1 for _ in fh) - 1
        return {"images": n, "image_px": p.eval_px, "seconds": seconds, "images_per_s": n / seconds,
                "batch": p.eval_batch, "note": "whole command: model build, decode, score, scores.csv, heatmaps"}

    return run


def predict_ray_row(runner: Runner, data: EvalData) -> Callable[[Any], dict]:
    def run(_) -> dict[str, Any]:
        try:
            import ray
        except ImportError as exc:
            raise Skip(f"ray is not installed (pip install 'clipad[ray]'; {one_line(exc)})") from None
        try:
            from clipad import distributed
        except ImportError as exc:
            raise Skip(f"clipad.distributed is not available ({one_line(exc)})") from None
        try:
            predict = distributed.predict
        except (ImportError, AttributeError) as exc:  # the package without its predict module
            raise Skip(f"clipad.distributed.predict is not available ({one_line(exc)})") from None

        p = runner.profile
        data.ready(min(120.0, runner.global_left()))
        files = data.test_files()
        out = data.tmp / "predict_ray"
        on_gpu = p.device.startswith("cuda")
        options = {"image_size": p.image_size} if p.image_size else {}
        wanted = {"detector": None, "method": "adaptclip", "backbone": p.backbone, "pretrained": None,
                  "options": options or None, "actors": 1, "gpus_per_actor": 1.0 if on_gpu else 0.0,
                  "batch_size": p.eval_batch, "progress": False}
        params = inspect.signature(predict).parameters
        takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
        kwargs = {k: v for k, v in wanted.items() if k in params or (takes_any and k in ("method", "pretrained"))}
        started_here = not ray.is_initialized()
        t = time.perf_counter()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                res = predict(files, str(out), **kwargs)
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()
        wall = time.perf_counter() - t
        failed = res.get("failed")
        if isinstance(failed, (list, tuple)):  # the failures themselves: their count, and the first few
            failed, failures = len(failed), [str(f)[:200] for f in failed[:3]]
        else:
            failures = []
        fig = {"images": res.get("images"), "images_per_s": res.get("images_per_s"), "seconds": res.get("seconds"),
               "scored": res.get("scored"), "failed": failed, "failures": failures, "wall_s": wall, "image_px": p.eval_px, "batch": p.eval_batch, "actors": 1,
               "gpus_per_actor": kwargs.get("gpus_per_actor"),
               "note": "images_per_s and seconds as clipad.distributed reports them; wall_s: the whole call"}
        if res.get("images") != len(files) or res.get("scored", len(files)) != len(files) or failed:
            raise RuntimeError(f"Ray predict scored {res.get('images')} of {len(files)} images "
                               f"({failed} failed: {failures})")
        return fig

    return run


# --------------------------------------------------------------------------- plan


def plan(profile: Profile, data: EvalData | None, runner: Runner | None) -> list[Group]:
    """Every group and row, in the order run (``data``/``runner`` None: ids only, for --list)."""
    import clipad
    from clipad.methods import get_method

    registered = clipad.list_methods()
    configs = method_configs(registered, profile.variants)
    seen_towers: set[tuple[str, int]] = set()
    groups: list[Group] = []

    def method_group(cfg: MethodConfig) -> Group:
        cls = get_method(cfg.method)
        options = dict(cfg.options)
        if cfg.method == "anoclip" and options.get("tta") and profile.tta_steps is not None:
            options["tta_steps"] = profile.tta_steps
        bb = profile.backbone or cls.default_backbone
        size = profile.image_size or _default_size(cls, bb, options)
        rows: list[Row] = []
        tower = (bb, size)
        if tower not in seen_towers and size is not None:
            seen_towers.add(tower)
            for dtype in profile.dtypes:
                for b in profile.batches:
                    rows.append(Row(f"backbone:{bb}@{size}/{dtype}/b{b}", "backbone",
                                    {"backbone": bb, "image_size": size, "dtype": dtype, "batch": b},
                                    backbone_row(runner, dtype, b)))
        batches = profile.set_batches if cfg.set_scoring else profile.batches
        # bf16 first (the targets), batch 32 before batch 1, then fp32
        for shots in cfg.shots:
            for dtype in profile.dtypes:
                for b in sorted(batches, reverse=True):
                    rows.append(Row(row_id(cfg, shots, dtype, b, cls.few_shot), "method",
                                    {"method": cfg.method, "backbone": bb, "image_size": size, "shots": shots,
                                     "dtype": dtype, "batch": b, "options": options},
                                    method_row(runner, cfg, shots, dtype, b)))

        def build():
            from clipad.errors import ClipadError

            try:
                return build_detector(cfg.method, profile, options)
            except ClipadError as exc:
                if not cfg.extra:
                    raise
                # a method being added that these settings do not fit: said, not a failure of the check
                raise Skip(f"{cfg.method} cannot be built with these settings: {one_line(exc)}") from None

        return Group(cfg.label, build, rows)

    for cfg in configs:
        if not cfg.extra:
            groups.append(method_group(cfg))
    if "adaptclip" in registered:
        pipe = [
            Row("eval:adaptclip-0shot", "eval", {"method": "adaptclip", "shots": 0}, eval_row(runner, data)),
            Row("predict:api", "predict", {"method": "adaptclip", "path": "Detector.predict"},
                predict_api_row(runner, data)),
            Row("predict:single", "predict", {"method": "adaptclip", "path": "clipad predict"},
                predict_single_row(runner, data)),
            Row("predict:ray", "predict", {"method": "adaptclip", "path": "clipad.distributed.predict, 1 actor"},
                predict_ray_row(runner, data)),
        ]
        groups.append(Group("pipeline", lambda: build_detector("adaptclip", profile, {}), pipe))
    for cfg in configs:
        if cfg.extra:
            groups.append(method_group(cfg))
    return groups


def _default_size(cls, backbone: str, options: dict[str, Any]) -> int | None:
    """The method's input size without building it: the option's default, else the class's rule
    for its backbone's patch size (None where that cannot be told beforehand)."""
    from types import SimpleNamespace

    size = options.get("image_size")
    if size is None:
        try:
            size = cls.Options().image_size
        except Exception:  # noqa: BLE001 - options with required fields
            size = None
    if size is None:
        try:
            import open_clip

            patch = open_clip.get_model_config(backbone)["vision_cfg"]["patch_size"]
            size = int(cls.default_input_size(SimpleNamespace(patch_size=(patch, patch), name=backbone)))
        except Exception:  # noqa: BLE001 - not an open_clip tower: known once built
            size = None
    return size


def filter_groups(groups: list[Group], patterns: list[str]) -> list[Group]:
    if not patterns:
        return groups

    def wanted(rid: str) -> bool:
        return any(fnmatch.fnmatchcase(rid, pat) or rid.startswith(pat) for pat in patterns)

    return [Group(g.name, g.build, [r for r in g.rows if wanted(r.id)]) for g in groups]


# --------------------------------------------------------------------------- facts and report


def machine_facts(profile: Profile, smoke: bool) -> dict[str, Any]:
    import torch

    import clipad

    dev = torch.device(profile.device)
    facts: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "mode": "smoke (CPU, tiny backbone, tiny images: checks the script, not the speed)" if smoke else "gpu",
        "device": str(dev),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clipad": clipad.__version__, "clipad_commit": git_commit(),
        "weights": "random (pretrained=None): the same compute as real weights; nothing downloaded",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "methods_registered": clipad.list_methods(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        facts.update({"gpu": torch.cuda.get_device_name(dev), "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                      "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"})
    try:  # without importing it (seconds)
        from importlib.metadata import PackageNotFoundError, version

        facts["ray"] = version("ray")
    except PackageNotFoundError:
        facts["ray"] = None
    return facts


def git_commit() -> str | None:
    """The checkout's commit (+dirty), else $CLIPAD_COMMIT (a copy of the tree without .git), else None."""
    fallback = os.environ.get("CLIPAD_COMMIT") or None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        return f"{v:,.0f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}" if a >= 0.01 else f"{v:.2g}"
    return str(v)


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    where = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_count')} cores; torch threads: {m.get('torch_threads')})"
    lines = [
        f"# clipad GPU check{' (smoke)' if record['smoke'] else ''}",
        "",
        f"{where}; device {m['device']}; torch {m['torch']} (CUDA {m.get('cuda')}); clipad {m['clipad']} "
        f"({m.get('clipad_commit') or 'commit unknown'}); {m['date_utc']} UTC; {record.get('elapsed_s', 0):.0f} s. "
        f"Weights: {m['weights']}. Median of the repeats column's timed calls ({record['settings']['repeats']}, 4x for "
        f"calls under 0.1 s, fewer to fit {record['settings']['row_budget_s']:g} s a row) after "
        f"{max(1, record['settings']['warmup'])} warm-up; peak MB: max allocated over the row on CUDA "
        "(resident MB: allocated before it), process peak RSS on CPU.",
        "",
        "| row | status | ms/image | images/s | x bare | TFLOP/s | peak MB | resident MB | repeats | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        note = r.get("reason") or r.get("note") or ""
        if r.get("targets"):
            note = f"issue 7: {r['targets']}" + (f"; {note}" if note else "")
        if r["kind"] in ("eval", "predict") and r["status"] == "ok":
            bits = [f"{r.get('images')} images at {r.get('image_px', '?')} px in {_fmt(r.get('seconds'))} s"]
            if r.get("wall_s") is not None:
                bits.append(f"wall {_fmt(r['wall_s'])} s")
            if r.get("run_s") is not None:
                bits.append(f"eval {_fmt(r['run_s'])} s + report {_fmt(r['report_s'])} s")
            note = "; ".join(bits + ([note] if note else []))
        lines.append("| " + " | ".join([
            f"`{r['id']}`", r["status"], _fmt(r.get("ms_per_image")), _fmt(r.get("images_per_s")),
            _fmt(r.get("x_bare")), _fmt(r.get("tflops")), _fmt(r.get("peak_mb")), _fmt(r.get("resident_mb")),
            _fmt(r.get("repeats")), note.replace("|", "/"),
        ]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny backbone at 64 px, fp32, batch 2, 8 generated images at 96 px: every row kind in about 30 s")
    ap.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu; --smoke: cpu")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="folder for gpu_check.json and gpu_check.md (--smoke: gpu_check_smoke.*); default %(default)s")
    ap.add_argument("--rows", default="", help="comma list of row-id globs or prefixes to run (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the row ids that would run, and exit")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="global budget in seconds: rows not started by then are recorded as skipped (default 420)")
    ap.add_argument("--row-budget-s", type=float, default=None,
                    help="time per timed row; repeats are lowered to fit (default 40; --smoke 10)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row, the median reported; 4x for calls under 0.1 s (default 5; --smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per row, at least 1 (default 2; --smoke 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--backbone", default=None,
                    help="one backbone for every method instead of each one's paper backbone (e.g. tiny, with "
                         "--image-size 64 --device cpu: a CPU rehearsal of the full GPU profile)")
    ap.add_argument("--image-size", type=int, default=None, help="one input size for every method instead of each one's")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    for name in ("row_budget_s", "repeats", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup is not None and args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO / "src") not in sys.path and not _importable("clipad"):
        sys.path.insert(0, str(REPO / "src"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    base = smoke_profile(device) if args.smoke else gpu_profile(device)
    overrides = {k: v for k, v in (("row_budget_s", args.row_budget_s), ("repeats", args.repeats),
                                   ("warmup", args.warmup), ("backbone", args.backbone),
                                   ("image_size", args.image_size)) if v is not None}
    from dataclasses import replace

    profile = replace(base, **overrides)
    patterns = [p.strip() for p in args.rows.split(",") if p.strip()]
    if args.list:
        for g in filter_groups(plan(profile, None, None), patterns):
            for r in g.rows:
                print(r.id)
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device; use --smoke or --device cpu", file=sys.stderr)
        return 2
    record: dict[str, Any] = {
        "smoke": args.smoke, "machine": machine_facts(profile, args.smoke),
        "settings": {"budget_s": args.budget_s, **{k: v for k, v in profile.__dict__.items()}},
        "rows_planned": [], "builds": {}, "rows": [],
    }
    runner = Runner(args, profile, record)
    data = EvalData(profile, nice=not args.smoke)

    def on_term(signum, frame):  # a kill from outside still leaves the JSON of every finished row
        record["interrupted"] = f"signal {signum}"
        runner.write()
        data.close()
        sys.exit(128 + signum)

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        groups = filter_groups(plan(profile, data, runner), patterns)
        record["rows_planned"] = [r.id for g in groups for r in g.rows]
        if any(r.kind in ("eval", "predict") for g in groups for r in g.rows):
            try:
                data.start()
            except Exception:  # noqa: BLE001 - the pipeline rows retry and record the error
                traceback.print_exc()
                data.proc = None
        m = record["machine"]
        print(f"# gpu_check on {m.get('gpu') or m['cpu']} ({device}), torch {m['torch']}, clipad {m['clipad']} "
              f"{m.get('clipad_commit') or ''}; {len(record['rows_planned'])} rows; budget {args.budget_s:g} s; "
              "random weights", flush=True)
        runner.write()
        runner.run(groups)
    except KeyboardInterrupt:
        record["interrupted"] = "KeyboardInterrupt"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        runner.write()
        data.close()
    print()
    print(markdown(record))
    print(f"-> {runner.out / (runner.stem + '.json')}, {runner.out / (runner.stem + '.md')}")
    if record.get("interrupted"):
        return 130
    # rows that failed are in the files; the exit code says so too
    return 1 if any(r["status"] == "error" for r in record["rows"]) else 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
