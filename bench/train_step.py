"""Training-step throughput: one full CycleGAN step (Zhu et al., 2017) — update
G and F against frozen D_X, D_Y, then update D_X and D_Y — in images/s and
peak memory, across image sizes, batch sizes, attention variants (none,
gates, self, both) and with/without the R1 penalty (Mescheder et al., 2018).

Every figure is a ratio against a *plain* PyTorch implementation of the same
step measured in the same process: the same networks
(``stain_search.models``), the same loss terms (LSGAN, cycle, identity,
optionally R1), ``torch.optim.Adam``, eager fp32, no image pools and no host
synchronisation inside the step. ``speedup`` = variant img/s ÷ plain img/s
at the same configuration.

Variants (``--variants``, ``--switches``), each a library setting:

    plain          the reference above
    fp32           stain_search.gan.CycleGAN.train_step, precision fp32, eager
    bf16           the same with bf16 autocast (train.precision bf16 — the
                   library's default on CUDA, 'auto')
    channels_last  fp32 + NHWC memory format (train.channels_last)
    fused          fp32 + torch's fused Adam (optim.fused)
    cudnn_benchmark fp32 + torch.backends.cudnn.benchmark          (CUDA only)
    compile        fp32 + torch.compile of G, F (and D_X, D_Y when R1 is off:
                   double backward does not compile) (train.compile)
    all            bf16 + every switch above
    consensus      fp32 + consensus optimisation (optim.name consensus,
                   Mescheder et al., 2017): Adam's step, plus a second forward
                   and a double backward through G, F, D_X and D_Y for
                   γ·∇½‖v‖²; its ratio to fp32 is its cost beside Adam

Two phases: the *grid* (every size × batch × attention × R1, for the
``--variants``) and the *switches* (each switch alone and all together, on a
few large configurations, ``--switch-*``): compiling every grid point would
take an hour.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed
steps (weights + optimiser state + activations); on CPU the growth of the
peak resident set (VmHWM) of a fresh forked process that builds the model and
runs two steps. FLOPs per step are counted once per configuration with
``torch.utils.flop_counter`` on the plain step (model FLOPs: the same math for
every variant); MFU = achieved FLOP/s ÷ the GPU's dense peak (bf16 for bf16
variants, TF32 for fp32 ones since cuDNN convolutions use TF32 by default).

    python bench/train_step.py                       # CPU (or CUDA when present)
    python bench/train_step.py --threads 1           # shared CPU: see common.set_threads
    python bench/train_step.py --device cuda         # GPU: grid + switches
    python bench/train_step.py --smoke-test          # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import gc
import statistics
import itertools
import multiprocessing
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402

import common  # noqa: E402
from stain_search.config import Config, load_config  # noqa: E402
from stain_search.errors import ConfigError  # noqa: E402
from stain_search.gan import Batch, CycleGAN  # noqa: E402
from stain_search.models import build_discriminator, build_generator, init_weights  # noqa: E402

R1_GAMMA = 1.0  # any γ > 0 costs the same: the double backward is what is measured


# --- what one measurement is ---------------------------------------------------------------

@dataclass(frozen=True)
class StepSpec:
    size: int
    batch: int
    attention: str
    r1: bool
    ngf: int
    ndf: int
    depth: int
    d_blocks: int

    def config(self, *, precision: str, **switches: Any) -> Config:
        """The training config of this step; ConfigError if the shape is invalid."""
        return load_config(None, {
            "data.crop": self.size, "data.batch_size": self.batch,
            "model.attention": self.attention, "model.ngf": self.ngf, "model.ndf": self.ndf,
            "model.depth": self.depth, "model.d_blocks": self.d_blocks,
            "loss.r1_gamma": R1_GAMMA if self.r1 else 0.0, "loss.r1_interval": 1,
            "train.precision": precision, **switches,
        })


# Model widths per preset: "small" is the bundled search spaces' CPU-sized model
# (search_spaces/lambda.yaml), "reference" the CycleGAN reference's widths at a
# depth every size here (64–256 px) and self-attention (≥ 2x2 bottleneck) allow.
PRESETS = {
    "tiny": dict(ngf=8, ndf=8, depth=3, d_blocks=2),
    "small": dict(ngf=16, ndf=16, depth=4, d_blocks=3),
    "reference": dict(ngf=64, ndf=64, depth=5, d_blocks=3),
}


@dataclass(frozen=True)
class Variant:
    description: str
    library: bool = True
    bf16: bool = False
    channels_last: bool = False
    fused: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False
    consensus: bool = False

    def overrides(self) -> dict[str, Any]:
        """The library settings this variant turns on."""
        return {"train.channels_last": self.channels_last, "optim.fused": self.fused,
                "train.compile": self.compile,
                "optim.name": "consensus" if self.consensus else "adam"}


VARIANTS: dict[str, Variant] = {
    "plain": Variant("plain PyTorch step, eager fp32 (the reference)", library=False),
    "fp32": Variant("CycleGAN.train_step, fp32, eager"),
    "bf16": Variant("CycleGAN.train_step, bf16 autocast", bf16=True),
    "channels_last": Variant("fp32 + train.channels_last", channels_last=True),
    "fused": Variant("fp32 + optim.fused (fused Adam)", fused=True),
    "cudnn_benchmark": Variant("fp32 + cudnn.benchmark", cudnn_benchmark=True),
    "compile": Variant("fp32 + train.compile", compile=True),
    "all": Variant("bf16 + channels_last + fused + cudnn.benchmark + compile",
                   bf16=True, channels_last=True, fused=True, cudnn_benchmark=True, compile=True),
    "consensus": Variant("fp32 + optim.name consensus (double backward through G, F, D)",
                         consensus=True),
}
CUDA_ONLY = {"cudnn_benchmark"}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


# --- the plain step: the obvious PyTorch code, for the ratio -------------------------------

class PlainCycleGAN:
    """The CycleGAN step as one would write it in an afternoon: same networks,
    same loss terms, torch.optim.Adam, eager fp32; D sees the current fakes
    (no image pool); losses stay on the device (no host sync inside)."""

    def __init__(self, config: Config, device: torch.device):
        torch.manual_seed(0)
        m, o, loss = config.model, config.optim, config.loss
        self.G, self.F = build_generator(m).to(device), build_generator(m).to(device)
        self.D_X, self.D_Y = build_discriminator(m).to(device), build_discriminator(m).to(device)
        for net in (self.G, self.F, self.D_X, self.D_Y):
            init_weights(net)
        betas = (o.beta1, o.beta2)
        self.opt_g = torch.optim.Adam(itertools.chain(self.G.parameters(), self.F.parameters()),
                                      lr=o.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(itertools.chain(self.D_X.parameters(), self.D_Y.parameters()),
                                      lr=o.lr_d or o.lr_g, betas=betas)
        self.lam, self.lam_id, self.gamma = loss.lambda_cycle, loss.lambda_identity, loss.r1_gamma

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, F, D_X, D_Y = self.G, self.F, self.D_X, self.D_Y
        # G: X→Y and F: Y→X against frozen discriminators.
        for p in itertools.chain(D_X.parameters(), D_Y.parameters()):
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        fake_y, fake_x = G(x), F(y)
        pred_y, pred_x = D_Y(fake_y), D_X(fake_x)
        loss_g = (nnf.mse_loss(pred_y, torch.ones_like(pred_y))
                  + nnf.mse_loss(pred_x, torch.ones_like(pred_x))
                  + self.lam * (nnf.l1_loss(F(fake_y), x) + nnf.l1_loss(G(fake_x), y)))
        if self.lam_id > 0:
            loss_g = loss_g + self.lam * self.lam_id * (nnf.l1_loss(G(y), y) + nnf.l1_loss(F(x), x))
        loss_g.backward()
        self.opt_g.step()
        for p in itertools.chain(D_X.parameters(), D_Y.parameters()):
            p.requires_grad_(True)
        # D_Y on real stain vs G's fakes, D_X on real H&E vs F's fakes (+ R1 on reals).
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = x.new_zeros(())
        for D, real, fake in ((D_Y, y, fake_y), (D_X, x, fake_x)):
            if self.gamma > 0:
                # `* 1`: a non-leaf input, which torch's FLOP counter can follow through autograd.grad
                real = real.detach().requires_grad_(True) * 1
            pred_real, pred_fake = D(real), D(fake.detach())
            loss_d = loss_d + 0.5 * (nnf.mse_loss(pred_real, torch.ones_like(pred_real))
                                     + nnf.mse_loss(pred_fake, torch.zeros_like(pred_fake)))
            if self.gamma > 0:
                (grad,) = torch.autograd.grad(pred_real.sum(), real, create_graph=True)
                loss_d = loss_d + self.gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()
        loss_d.backward()
        self.opt_d.step()
        return loss_g.detach(), loss_d.detach()


# --- the library step and its switches -----------------------------------------------------

@contextmanager
def switches(v: Variant) -> Iterator[None]:
    """Process-wide settings a variant needs while it runs, undone afterwards."""
    saved_bench = torch.backends.cudnn.benchmark
    if v.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved_bench


StepFn = Callable[[torch.Tensor, torch.Tensor], Any]


def build_step(spec: StepSpec, v: Variant, device: torch.device) -> tuple[StepFn, str]:
    """(step function, note) for one variant of one configuration."""
    if not v.library:
        plain = PlainCycleGAN(spec.config(precision="fp32"), device)
        return plain.step, ""
    config = spec.config(precision="bf16" if v.bf16 else "fp32", **v.overrides())
    model = CycleGAN(config, device=device, seed=0)
    note = "D eager (R1 double backward)" if v.compile and spec.r1 else ""
    return (lambda x, y: model.train_step(Batch(x=x, y=y))), note


def inputs(spec: StepSpec, device: torch.device, *, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (spec.batch, 3, spec.size, spec.size)  # (B, 3, H, W) in [-1, 1]
    x, y = (torch.rand(shape, generator=g) * 2 - 1 for _ in range(2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (x.to(device).contiguous(memory_format=fmt), y.to(device).contiguous(memory_format=fmt))


# --- measuring one configuration ------------------------------------------------------------

@dataclass
class Built:
    """One variant, built and warmed up, waiting for its timing rounds."""
    name: str
    variant: Variant
    step: StepFn
    x: torch.Tensor
    y: torch.Tensor
    note: str
    per_step_s: list[float] = field(default_factory=list)  # one entry per round


def run_round(b: Built, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, under the variant's switches."""
    with switches(b.variant):
        common.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b.step(b.x, b.y)
        common.synchronize(device)
    return (time.perf_counter() - t0) / steps


def fresh_compile_caches() -> None:
    """Dynamo keeps a few graphs per code object and silently runs eager beyond
    that; every variant of a configuration compiles its own G/F/D instances."""
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def count_flops(spec: StepSpec, device: torch.device) -> float | None:
    """Model FLOPs of one step (forward + backward, R1's double backward included)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        plain = PlainCycleGAN(spec.config(precision="fp32"), device)
        x, y = inputs(spec, device, channels_last=False)
        with FlopCounterMode(display=False) as counter:
            plain.step(x, y)
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - a missing count must not stop the benchmark
        print(f"  (FLOP count failed for {spec}: {err})", flush=True)
        return None


def _cpu_peak_child(spec: StepSpec, name: str, threads: int | None) -> float | None:
    """In a fresh forked process: growth of the peak RSS over build + 2 steps."""
    common.set_threads(threads)
    v = variant(name)
    device = torch.device("cpu")
    with switches(v):
        # A forked child has not yet touched torch's code pages: a first, tiny
        # step of the same kind faults them in, so the baseline below holds
        # them and the growth that follows is the model's own memory.
        warm = StepSpec(32, 1, "both", spec.r1, **PRESETS["tiny"])
        warm_step, _ = build_step(warm, v, device)
        wx, wy = inputs(warm, device, channels_last=v.channels_last)
        for _ in range(2):
            warm_step(wx, wy)
        del warm_step, wx, wy
        gc.collect()
        common.reset_peak_rss()
        base = common.rss_mib()
        step, _ = build_step(spec, v, device)
        x, y = inputs(spec, device, channels_last=v.channels_last)
        for _ in range(2):
            step(x, y)
    peak = common.peak_rss_mib()
    return None if peak is None or base is None else peak - base


_POOL_CONTEXT: list[Any] = []


def cpu_peak_mib(spec: StepSpec, name: str, threads: int | None) -> float | None:
    if not _POOL_CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        # The fork server imports torch once; each measurement forks a clean child
        # from it in milliseconds, with no memory left over from earlier variants.
        ctx.set_forkserver_preload(["torch", "stain_search.gan", "stain_search.models"])
        _POOL_CONTEXT.append(ctx)
    with _POOL_CONTEXT[0].Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_cpu_peak_child, (spec, name, threads))


# Dense peak TFLOP/s per GPU from NVIDIA's datasheets: (bf16, tf32, fp32).
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),  # SXM5 (reported as "H100 80GB HBM3")
    "H200": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.05, 183.0, 91.6),
}


def peak_flops(device: torch.device, v: Variant) -> tuple[float | None, str]:
    """(peak FLOP/s, which peak) for MFU; None where unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if v.bf16:
                return bf16 * 1e12, f"bf16 {bf16:g}T"
            if torch.backends.cudnn.allow_tf32:
                return tf32 * 1e12, f"tf32 {tf32:g}T"
            return fp32 * 1e12, f"fp32 {fp32:g}T"
    return None, ""


def cuda_peak_mib(spec: StepSpec, name: str, device: torch.device) -> float:
    """Peak CUDA memory of one variant alone: weights, optimiser state, activations."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    v = variant(name)
    with switches(v):
        step, _ = build_step(spec, v, device)
        x, y = inputs(spec, device, channels_last=v.channels_last)
        for _ in range(2 + (2 if v.compile else 0)):
            step(x, y)
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step, x, y
    return peak / common.MIB


def _error(err: BaseException) -> str:
    return f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def measure_config(spec: StepSpec, names: list[str], device: torch.device, *, args,
                   flops: float | None, phase: str) -> list[dict[str, Any]]:
    """Every variant of one configuration, timed in interleaved rounds (plain,
    fp32, …, plain, fp32, …) so that a change in machine load hits them all
    alike; ms/step is the median over rounds. Memory is measured afterwards,
    one variant at a time."""
    rows = {n: {"phase": phase, **asdict(spec), "variant": n, "note": ""} for n in names}
    try:
        spec.config(precision="fp32")
    except ConfigError as err:
        for row in rows.values():
            row["note"] = f"skipped: {err}"
        return list(rows.values())
    if any(VARIANTS[n].compile for n in names):
        fresh_compile_caches()
    built: list[Built] = []
    for name in names:
        v = variant(name)
        if name in CUDA_ONLY and device.type != "cuda":
            rows[name]["note"] = "CUDA only"
            continue
        try:
            step, note = build_step(spec, v, device)
            x, y = inputs(spec, device, channels_last=v.channels_last)
            b = Built(name, v, step, x, y, note)
            run_round(b, args.warmup + (2 if v.compile else 0), device)  # compiles, allocates
            built.append(b)
        except Exception as err:  # noqa: BLE001 - one failing switch must not end the run
            rows[name]["note"] = _error(err)
            if args.verbose:
                traceback.print_exc()
    for _ in range(args.rounds):
        for b in list(built):
            try:
                b.per_step_s.append(run_round(b, args.steps, device))
            except Exception as err:  # noqa: BLE001
                rows[b.name]["note"] = _error(err)
                built.remove(b)
    timed = {b.name: (statistics.median(b.per_step_s), b.note, len(b.per_step_s)) for b in built}
    del built, b
    gc.collect()
    plain_s = timed.get("plain", (None,))[0]
    for name, (per_step, note, rounds) in timed.items():
        row = rows[name]
        row.update(steps=rounds * args.steps, ms_step=1000 * per_step, img_s=spec.batch / per_step,
                   speedup=plain_s / per_step if plain_s else None, note=note,
                   loadavg_1m=(common.loadavg() or [None])[0])
        if flops:
            row["gflop_img"] = flops / spec.batch / 1e9
            row["tflop_s"] = flops / per_step / 1e12
            peak, which = peak_flops(device, VARIANTS[name])
            if peak:
                row["mfu"], row["mfu_peak"] = flops / per_step / peak, which
        if not args.memory or (VARIANTS[name].compile and not args.compile_memory):
            continue
        try:
            row["peak_mib"] = (cpu_peak_mib(spec, name, args.threads) if device.type == "cpu"
                               else cuda_peak_mib(spec, name, device))
        except Exception as err:  # noqa: BLE001
            row["note"] = (row["note"] + f" memory {_error(err)}").strip()
    return list(rows.values())


# --- the run ------------------------------------------------------------------------------

COLUMNS = ["size", "batch", "attention", "r1", "variant", "img_s", "ms_step", "speedup",
           "peak_mib", "gflop_img", "tflop_s", "mfu", "note"]
HEADERS = ["px", "batch", "attention", "R1", "variant", "img/s", "ms/step", "vs plain",
           "peak MiB", "GFLOP/img", "TFLOP/s", "MFU", "note"]


def jobs(args, preset: dict[str, int]) -> list[tuple[str, StepSpec, list[str]]]:
    """(phase, spec, variants) in run order: the grid, then the switches."""
    out = []
    for size, batch, attention, r1 in itertools.product(args.sizes, args.batches,
                                                        args.attention, args.r1):
        out.append(("grid", StepSpec(size, batch, attention, r1, **preset), args.variants))
    if args.switches:
        sw = ["plain", "fp32"] + [s for s in args.switches if s not in ("plain", "fp32")]
        for size, batch, attention, r1 in itertools.product(args.switch_sizes, args.switch_batches,
                                                            args.switch_attention, args.r1):
            out.append(("switches", StepSpec(size, batch, attention, r1, **preset), sw))
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: geometric-mean speed-up over plain across its configurations."""
    out = []
    for phase in ("grid", "switches"):
        names = dict.fromkeys(r["variant"] for r in rows if r["phase"] == phase)
        for name in names:
            ups = [r.get("speedup") for r in rows if r["phase"] == phase and r["variant"] == name]
            ups = [u for u in ups if u]
            if ups:
                out.append({"phase": phase, "variant": name, "configs": len(ups),
                            "geomean_speedup": common.geometric_mean(ups),
                            "min": min(ups), "max": max(ups),
                            "description": VARIANTS[name].description})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    strs = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    onoff = lambda s: [{"on": True, "off": False}[v] for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="model widths (default: small on CPU, reference on CUDA)")
    p.add_argument("--sizes", type=ints, default=[64, 128, 256])
    p.add_argument("--batches", type=ints, default=None, help="default: 1,4 (CPU), 1,4,16 (CUDA)")
    p.add_argument("--attention", type=strs, default=["none", "gates", "self", "both"])
    p.add_argument("--r1", type=onoff, default=[False, True], help="off,on")
    p.add_argument("--variants", type=strs, default=None,
                   help="grid variants (default: plain,fp32 on CPU; plain,fp32,bf16 on CUDA)")
    p.add_argument("--switches", type=strs, default=None,
                   help="switch-phase variants ('' to skip; default: every switch on CUDA, "
                        "none on CPU)")
    p.add_argument("--switch-sizes", type=ints, default=None, help="default: the largest size")
    p.add_argument("--switch-batches", type=ints, default=None, help="default: the largest batch")
    p.add_argument("--switch-attention", type=strs, default=["none", "both"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=None, help="steps (default: 1 CPU, 5 CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per round (default: 2 CPU, 20 CUDA)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory pass")
    p.add_argument("--compile-memory", action="store_true",
                   help="also measure compiled variants' memory (compiles them again)")
    p.add_argument("--json", default=None, help="default: bench/results/train_step[-cuda].json")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="a tiny configuration, in seconds")
    args = p.parse_args(argv)
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if args.device == "auto" else args.device
    cuda = args.device == "cuda"
    if args.smoke_test:
        args.preset, args.sizes, args.batches = "tiny", [32], [2]
        args.attention, args.r1 = ["self"], [True]  # R1: the step's most involved path
        args.variants = args.variants or ["plain", "fp32"]
        args.switches = ["fused", "channels_last", "bf16"] if args.switches is None \
            else args.switches
        args.switch_sizes, args.switch_batches, args.switch_attention = [32], [2], ["none"]
        args.warmup, args.steps, args.rounds = 1, 1, 2
        args.threads = args.threads or 1
    args.preset = args.preset or ("reference" if cuda else "small")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.steps = args.steps or (20 if cuda else 2)
    args.batches = args.batches or ([1, 4, 16] if cuda else [1, 4])
    args.variants = args.variants or (["plain", "fp32", "bf16"] if cuda else ["plain", "fp32"])
    if args.switches is None:
        # consensus is an optimiser, not a speed switch: measured when asked for.
        args.switches = [n for n in VARIANTS
                         if n not in ("plain", "fp32", "consensus")] if cuda else []
    args.switch_sizes = args.switch_sizes or [max(args.sizes)]
    args.switch_batches = args.switch_batches or [max(args.batches)]
    for name in args.variants + args.switches:
        variant(name)
    if "plain" not in args.variants:
        args.variants = ["plain"] + args.variants  # every ratio needs its reference
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = common.begin("train_step", args.threads)
    preset = PRESETS[args.preset]
    print(f"model preset {args.preset}: {preset}; device {device}")
    rows: list[dict[str, Any]] = []
    flop_cache: dict[StepSpec, float | None] = {}
    print(common.format_table([], COLUMNS, headers=HEADERS), flush=True)
    for phase, spec, names in jobs(args, preset):
        if spec not in flop_cache:
            try:
                spec.config(precision="fp32")
                flop_cache[spec] = count_flops(spec, device)
            except ConfigError:
                flop_cache[spec] = None
        for row in measure_config(spec, names, device, args=args, flops=flop_cache[spec],
                                  phase=phase):
            rows.append(row)
            print(common.format_table([row], COLUMNS, headers=HEADERS).splitlines()[-1], flush=True)
    summary = summarize(rows)
    print("\nspeed-up over the plain step (geometric mean over configurations):")
    print(common.format_table(summary, ["phase", "variant", "configs", "geomean_speedup", "min",
                                        "max", "description"],
                              headers=["phase", "variant", "configs", "geomean", "min", "max",
                                       "what"]))
    print("\nfull table (Markdown):")
    print(common.format_table(rows, COLUMNS, headers=HEADERS))
    name = "train_step-cuda" if device.type == "cuda" else "train_step"
    common.finish(name, args.json, info, {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "preset": preset, "variants": {k: asdict(v) for k, v in VARIANTS.items()},
        "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
