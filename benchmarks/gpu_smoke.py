"""Is training correct on this node? Real ``launchers/train.py`` processes on synthetic data, one line per check.

    python benchmarks/gpu_smoke.py                               # one CUDA device, bf16, 224 px (2 ranks with 2+ GPUs)
    python benchmarks/gpu_smoke.py --device cpu --img-size 32    # the same checks on the CPU, fp32 (how CI runs it)

Each line is ``PASS``, ``FAIL`` (with the reason and the end of the process's log) or ``SKIP`` (with the reason);
the exit status is 1 when any check failed. For each rank count (2 under torchrun where there are 2 devices):

    train LOADER  a few dozen steps with each importable loader (FFCV moving batches to the GPU, DALI decoding
                  ``mixed`` on the GPU): status FINISHED, the loss finite and falling; images/s and data-wait fraction
    stop          SIGUSR1 mid-epoch: a checkpoint at that step, status STOPPED, exit 0 (no SLURM job to requeue)
    resume        the same command again: "resuming at step N", trained to the end, status FINISHED
    eval          the resumed run evaluated the model and its EMA (val_top1, val_ema_top1 in final_metrics.json)
    export        ``launchers/export.py RUN --out DIR``; ``timm.create_model("local-dir:DIR", pretrained=True)`` and the
                  checkpoint's own weights score alike (eager fp32, the run's val loader, ``pipeline.engine.evaluate``)
    syncs         (one rank) the trainer's steady step at ZeRO 0, 1 and 2, as the trainer sets it up on this device,
                  with ``pipeline.syncs.count_syncs``: no device synchronize and no host read per step (on CUDA,
                  ``torch.cuda.set_sync_debug_mode`` counts every synchronizing CUDA call)

Everything is written under a temporary directory (``--work-dir`` keeps it). SLURM and torchrun variables are
removed from the children's environment: a STOPPED run inside a SLURM job would otherwise requeue that job.
``benchmarks/gpu_step.py`` reuses the data and process helpers defined here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_loaders.errors import SovitError
from pipeline.result import Status

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launchers" / "train.py"
EXPORT = ROOT / "launchers" / "export.py"
LOADERS = ("torchvision", "ffcv", "dali")  # torchvision first: it is always there, and stop/resume use it
LOADER_MODULES = {"torchvision": "torchvision", "ffcv": "ffcv.loader", "dali": "nvidia.dali.plugin.pytorch"}
CLASSES = 4
SYNC_STEPS = {"cuda": 20, "cpu": 5}  # steady steps the syncs check counts over, after 3 warm-up steps (compile)
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


class CheckFailed(SovitError):
    """A check's one-line reason; ``log`` is the process output worth showing under the FAIL line."""

    exit_code = 1

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


# ---------------------------------------------------------------------------------------------- helpers (shared)


def missing_loaders(loaders: list[str]) -> dict[str, str]:
    """``{loader: reason}`` for each loader whose backend does not import here (the GPU image has no FFCV/DALI)."""
    missing = {}
    for name in loaders:
        try:
            importlib.import_module(LOADER_MODULES[name])
        except Exception as e:  # a broken install (a C extension for another Python) is as unusable as none
            missing[name] = f"not importable ({type(e).__name__}: {e})".replace("\n", " ")
    return missing


def make_data(root: Path, loaders: list[str], train_images: int, val_images: int, size: int) -> dict[str, tuple]:
    """Synthetic JPEGs (``CLASSES`` classes) and, when FFCV is asked for, their .beton files: ``{loader: (train,
    val)}``. Images are 8/7 of the crop, as a 256-px copy of ImageNet is for a 224 crop."""
    from data_loaders.synthetic import generate

    folder = generate(root / "images", classes=CLASSES, per_class=train_images // CLASSES, size=size * 8 // 7,
                      val_per_class=max(1, val_images // CLASSES), seed=0)
    paths = {name: (folder / "train", folder / "val") for name in loaders}
    if "ffcv" in loaders:
        from data_loaders import sidecar_path
        from data_loaders.convert import ConvertOptions, convert

        opts = ConvertOptions(max_resolution=size * 8 // 7)
        betons = (root / "train.beton", root / "val.beton")
        convert(folder / "train", betons[0], options=opts, progress=False)
        convert(folder / "val", betons[1], classes_from=sidecar_path(betons[0]), options=opts, progress=False)
        paths["ffcv"] = betons
    return paths


def child_env(device: str) -> dict[str, str]:
    """This environment without SLURM's and torchrun's variables (each child is its own job), on ``device``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu means the CPU even on a GPU node
    return env


def launch_command(ranks: int) -> list[str]:
    """How to start a Python script on ``ranks`` local ranks: this interpreter, under torchrun for several
    (``--standalone``: torchrun binds its own free port, so no other process can take it between a pick and a bind)."""
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def train_command(sets: list[str], ranks: int) -> list[str]:
    return [*launch_command(ranks), str(TRAIN), *[arg for s in sets for arg in ("--set", s)]]


def workers(ranks: int) -> int:
    """Loader workers (decode threads) per rank: the rank's share of the cores less one for its training process,
    at most 8. FFCV given every core starves the step it feeds (10x slower steps on 2 CPU cores, with a data-wait
    fraction near 0, since its threads take the compute's cores rather than making it wait)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // ranks - 1))


class Process:
    """A child whose output goes to a file (an unread pipe fills up and stalls it), in its own process group, so
    that leaving the ``with`` block early (a timeout, a failed check, Ctrl-C) ends it with its ranks and workers."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def expect_exit(self, timeout: float, what: str) -> str:
        """Wait; the output, or CheckFailed naming ``what`` on a timeout or a non-zero exit status."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{what} did not exit within {timeout:.0f} s", self.output()) from None
        if rc != 0:
            raise CheckFailed(f"{what} exited {rc}", self.output())
        return self.output()

    def rank_pids(self) -> list[int]:
        """The training processes: this one, or torchrun's workers (its agent dies of a SIGUSR1 it does not
        handle, and a DataLoader worker would too)."""
        if "torch.distributed.run" not in self.proc.args:
            return [self.proc.pid]
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children() if str(TRAIN) in " ".join(c.cmdline())]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(records: list[dict], left_out: Callable[[int], bool] = lambda step: False) -> tuple[float, float]:
    """Images/s and data-wait fraction of metrics.jsonl's logged intervals, weighted by their time, leaving out the
    first (compile, warm-up) and those whose step ``left_out`` names."""
    perf = [r for r in records if "perf/images_per_s" in r][1:]
    perf = [r for r in perf if not left_out(r["step"])]
    if not perf:
        raise CheckFailed("metrics.jsonl has no perf/images_per_s to measure (after the first log)")
    seconds = sum(r["perf/step_time_s"] for r in perf)
    images = sum(r["perf/images_per_s"] * r["perf/step_time_s"] for r in perf)
    wait = sum(r["perf/data_wait_frac"] * r["perf/step_time_s"] for r in perf)
    return images / seconds, wait / seconds


def final_metrics(run_dir: Path) -> dict:
    path = run_dir / "final_metrics.json"
    if not path.is_file():
        raise CheckFailed(f"{path} was not written")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- the checks


@dataclass
class Smoke:
    """The settings every run shares; one epoch is half of ``steps``, so runs cross an epoch boundary."""

    work: Path
    device: str
    img_size: int
    batch: int
    steps: int
    timeout: float
    data: dict[str, tuple] | None = None

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "cuda" else "fp32"

    def sets(self, loader: str, run_dir: Path, ranks: int) -> list[str]:
        train, val = self.data[loader]
        return [
            "model.arch=sovit_7", f"model.img_size={self.img_size}", f"data.img_size={self.img_size}",
            f"model.num_classes={CLASSES}", f"data.loader={loader}", f"data.train={train}", f"data.val={val}",
            f"data.micro_batch_size={self.batch // ranks}", f"train.global_batch_size={self.batch}",
            f"data.workers={workers(ranks)}",
            f"train.precision={self.precision}", f"train.max_steps={self.steps}", "schedule.epochs=2",
            "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0",
            f"optim.base_batch_size={self.batch}",  # lr 1e-3: the loss visibly falls within a few dozen steps
            "train.log_every_steps=1", "train.stop_check_every_steps=1", f"checkpoint.run_dir={run_dir}",
            "tracking.enabled=false",
        ]

    def start(self, loader: str, run_dir: Path, ranks: int, log: str) -> Process:
        cmd = train_command(self.sets(loader, run_dir, ranks), ranks)
        return Process(cmd, self.work / f"{run_dir.name}-{log}.log", child_env(self.device))

    def train_to_exit(self, loader: str, run_dir: Path, ranks: int, log: str) -> str:
        with self.start(loader, run_dir, ranks, log) as proc:
            return self.started_as_asked(proc.expect_exit(self.timeout, f"train.py ({log})"), ranks)

    def started_as_asked(self, out: str, ranks: int) -> str:
        """``out``, once its starting line shows the ranks, device and precision asked for: a run that fell back to
        the CPU would pass every other check while testing nothing of the GPU."""
        want = f"{ranks} rank(s) on {self.device} ({'nccl' if self.device == 'cuda' else 'gloo'}), {self.precision},"
        if want not in out:
            raise CheckFailed(f"the run did not start with '{want}'", out)
        return out

    def train(self, loader: str, ranks: int) -> str:
        run_dir = self.work / f"train-{loader}-{ranks}"
        out = self.train_to_exit(loader, run_dir, ranks, "train")
        final = final_metrics(run_dir)
        if final["status"] != Status.FINISHED or final["step"] != self.steps:
            raise CheckFailed(f"status {final['status']} at step {final['step']}, expected FINISHED at {self.steps}",
                              out)
        records = read_jsonl(run_dir / "metrics.jsonl")
        losses = [r["train/loss"] for r in records if "train/loss" in r]
        if not losses or not all(math.isfinite(v) for v in losses):
            raise CheckFailed(f"losses not finite: {losses}", out)
        third = max(1, len(losses) // 3)
        first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
        if not last < first:
            raise CheckFailed(f"the loss did not fall: mean of the first {third} steps {first:.3f}, of the last "
                              f"{third} {last:.3f}", out)
        ips, wait = throughput(records)
        note = {"ffcv": f", FFCV ToDevice({self.device})",
                "dali": f", DALI {'mixed' if self.device == 'cuda' else 'cpu'} decoding"}.get(loader, "")
        return (f"{self.steps} steps on {self.device}, {self.precision}, loss {first:.2f}->{last:.2f}, "
                f"{ips:.0f} img/s, data wait {100 * wait:.0f}%{note}")

    def stop(self, run_dir: Path, ranks: int) -> str:
        """SIGUSR1 once the first step is logged; half the steps are one epoch, so the stop lands mid-epoch."""
        with self.start("torchvision", run_dir, ranks, "stop") as proc:
            deadline = time.monotonic() + self.timeout
            while not any("train/loss" in r for r in read_jsonl(run_dir / "metrics.jsonl")):
                if proc.proc.poll() is not None or time.monotonic() > deadline:
                    raise CheckFailed("training ended or stalled before its first logged step", proc.output())
                time.sleep(0.05)
            for pid in proc.rank_pids():
                os.kill(pid, signal.SIGUSR1)
            out = self.started_as_asked(proc.expect_exit(self.timeout, "train.py after SIGUSR1"), ranks)
        final = final_metrics(run_dir)
        step, per_epoch = final["step"], self.steps // 2
        latest = (run_dir / "latest").read_text().strip() if (run_dir / "latest").is_file() else None
        if final["status"] != Status.STOPPED or final.get("signal") != "SIGUSR1":
            raise CheckFailed(f"status {final['status']} (signal {final.get('signal')}), expected STOPPED by SIGUSR1",
                              out)
        if step % per_epoch == 0 or latest != f"step_{step:08d}":
            raise CheckFailed(f"stopped at step {step} with latest {latest}: expected a mid-epoch checkpoint of "
                              f"that step ({per_epoch} steps per epoch)", out)
        return (f"SIGUSR1 -> checkpoint {latest} (epoch {step // per_epoch}, batch {step % per_epoch} of {per_epoch}), "
                "status STOPPED, exit 0")

    def resume(self, run_dir: Path, ranks: int) -> str:
        stopped = final_metrics(run_dir)["step"]
        out = self.train_to_exit("torchvision", run_dir, ranks, "resume")
        final = final_metrics(run_dir)
        if f"resuming at step {stopped}" not in out:
            raise CheckFailed(f"no 'resuming at step {stopped}' in the output", out)
        if final["status"] != Status.FINISHED or final["step"] != self.steps:
            raise CheckFailed(f"status {final['status']} at step {final['step']}, expected FINISHED at {self.steps}",
                              out)
        return f"resuming at step {stopped}, FINISHED at step {self.steps}"

    def eval(self, run_dir: Path) -> str:
        final = final_metrics(run_dir)
        found = {k: final.get(k) for k in ("val_top1", "val_ema_top1")}
        if not all(isinstance(v, float) and math.isfinite(v) for v in found.values()):
            raise CheckFailed(f"final_metrics.json: {found}, expected finite val_top1 and val_ema_top1")
        return (f"top-1 {found['val_top1']:.2f}, EMA top-1 {found['val_ema_top1']:.2f} "
                f"({final.get('val_samples')} images)")

    def export(self, run_dir: Path) -> str:
        """Deterministic: the same weights through two paths, in the same arithmetic. The run's own eval (compiled,
        bf16 on a GPU) is printed beside them, not compared: a near-chance 4-class model flips images between
        compiled and eager bf16."""
        out_dir = self.work / f"{run_dir.name}-export"
        with Process([sys.executable, str(EXPORT), str(run_dir), "--out", str(out_dir)],
                     self.work / f"{out_dir.name}.log", child_env(self.device)) as proc:
            proc.expect_exit(self.timeout, "export.py")
        exported, checkpoint = evaluate_export(out_dir, run_dir, self.device)
        if (exported["top1"], exported["top5"]) != (checkpoint["top1"], checkpoint["top5"]) or not math.isclose(
                exported["loss"], checkpoint["loss"], rel_tol=1e-6):
            raise CheckFailed(f"the export scores {exported}, the checkpoint's weights {checkpoint} (eager fp32)")
        run = final_metrics(run_dir)["val_top1"]
        return (f"local-dir:{out_dir.name} in timm: top-1 {exported['top1']:.2f}, the checkpoint's weights "
                f"{checkpoint['top1']:.2f} (eager fp32, {exported['samples']} images); the run's own eval {run:.2f}")

    def syncs(self) -> str:
        cmd = [sys.executable, __file__, "--syncs-worker", "--device", self.device, "--img-size", str(self.img_size),
               "--batch", str(self.batch)]
        with Process(cmd, self.work / "syncs.log", child_env(self.device)) as proc:
            out = proc.expect_exit(self.timeout, "the syncs check")
        counts = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))
        if any(counts.values()):
            raise CheckFailed(f"syncs in {SYNC_STEPS[self.device]} steady steps, by ZeRO stage: {counts}", out)
        gpu = ", channels_last, compiled at ZeRO-0" if self.device == "cuda" else ""
        return (f"0 device syncs in {SYNC_STEPS[self.device]} steady steps at ZeRO 0, 1 and 2 ({self.precision}, "
                f"mixup, EMA{gpu})")


def evaluate_export(out_dir: Path, run_dir: Path, device: str) -> tuple[dict, dict]:
    """``timm.create_model("local-dir:OUT", pretrained=True)`` and the run's newest checkpoint's weights in a model
    built from its config, each scored by ``pipeline.engine.evaluate`` on the run's val loader in eager fp32, in
    this process."""
    import timm
    import torch

    import data_loaders
    import pipeline.models  # noqa: F401  (registers sovit_* with timm)
    from pipeline import engine
    from pipeline.config import load_config
    from pipeline.export import consolidated_state_dict

    cfg = load_config([run_dir / "config.yaml"])
    dev = torch.device(device)
    m = cfg.model
    reference = timm.create_model(m.arch, num_classes=m.num_classes, img_size=m.img_size, head=m.head)
    reference.load_state_dict(consolidated_state_dict(run_dir))
    loader = data_loaders.build(cfg.data, "val", 0, 1, dev, num_classes=m.num_classes)
    exported = timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    return engine.evaluate(exported.to(dev), loader, "fp32", dev), engine.evaluate(reference.to(dev), loader, "fp32",
                                                                                   dev)


def syncs_worker(device: str, img: int, batch: int) -> None:
    """``--syncs-worker``: ``count_syncs`` over SYNC_STEPS steady steps of the trainer's step at ZeRO 0, 1 and 2.
    Prints ``RESULT {"ZeRO-N": {kind: count}}``."""
    from pipeline import distributed
    from pipeline.syncs import count_syncs

    info = distributed.init()
    counts = {}
    for stage in (0, 1, 2):
        step = trainer_step(stage, info.device, img, batch)
        for n in range(1, 4):
            step(n)
        gc.collect()  # the last stage's engine, destroyed in the window, would synchronize (DeepSpeed's destroy())
        with count_syncs(info.device) as found:
            for n in range(4, 4 + SYNC_STEPS[device]):
                step(n)
        counts[f"ZeRO-{stage}"] = dict(found)
    print("RESULT " + json.dumps(counts), flush=True)
    distributed.shutdown()


def trainer_step(stage: int, device, img: int, batch: int) -> Callable[[int], None]:
    """The trainer's step n (``train_micro_step``, the lr schedule's update, the EMA's update) with the trainer's
    settings for this device (bf16, channels_last and compile on CUDA: compiled at ZeRO-0 only, three compilations
    would triple the check's time), built as the trainer builds it, on random tensors already on the device."""
    import timm
    import torch
    from timm.utils import ModelEmaV3

    import pipeline.models  # noqa: F401  (registers sovit_* with timm)
    from pipeline import engine
    from pipeline.config import load_config

    on_gpu = device.type == "cuda"
    cfg = load_config(overrides=[
        "model.arch=sovit_7", f"model.img_size={img}", f"data.img_size={img}", f"model.num_classes={CLASSES}",
        f"data.micro_batch_size={batch}", f"train.global_batch_size={batch}", f"train.zero_stage={stage}",
        f"train.precision={'bf16' if on_gpu else 'fp32'}", f"data.channels_last={on_gpu}",
        f"train.compile={on_gpu and stage == 0}"])
    model = timm.create_model(cfg.model.arch, num_classes=CLASSES, img_size=img).to(device)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, device=device)
    eng, scheduler = engine.build_engine(cfg, model, 1, updates_per_epoch=100)
    engine.to_param_layout(cfg, ema.module)
    mixup = engine.build_mixup(cfg)
    criterion = engine.build_criterion(cfg, mixup)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def step(n: int) -> None:
        engine.train_micro_step(eng, criterion, mixup, x.clone(), y, on_gpu)  # mixup mixes in place
        scheduler.step_update(n)
        ema.update(eng.module, step=n)

    return step


def report_failure(name: str, e: CheckFailed) -> None:
    """The FAIL line, then the end of the process's log, indented."""
    print(f"FAIL {name}: {e}", *["    " + line for line in e.log.splitlines()[-40:]], sep="\n", flush=True)


def check(name: str, fn, *args) -> bool:
    """Run one check and print its line; False when it failed."""
    try:
        detail = fn(*args)
    except CheckFailed as e:
        report_failure(name, e)
        return False
    except Exception as e:  # an unexpected error is a failed check, not the end of the other checks
        report_failure(name, CheckFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        return False
    print(f"PASS {name}: {detail}", flush=True)
    return True


def run_checks(smoke: Smoke, loaders: list[str], ranks: int, missing: dict[str, str]) -> bool:
    suffix = "" if ranks == 1 else f" ({ranks} ranks)"
    ok = True
    for loader in loaders:
        if loader in missing:
            print(f"SKIP train {loader}{suffix}: {missing[loader]}", flush=True)
        else:
            ok &= check(f"train {loader}{suffix}", smoke.train, loader, ranks)
    run_dir = smoke.work / f"stop-resume-{ranks}"
    for name, fn, args in (("stop", smoke.stop, (run_dir, ranks)), ("resume", smoke.resume, (run_dir, ranks))):
        if not check(f"{name}{suffix}", fn, *args):
            print(f"SKIP the remaining checks{suffix}: they need the resumed run", flush=True)
            return False
    ok &= check(f"eval{suffix}", smoke.eval, run_dir)
    ok &= check(f"export{suffix}", smoke.export, run_dir)
    return (ranks > 1 or check("syncs", smoke.syncs)) and ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, help="global batch (default: 64 on cuda, 8 on cpu)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run, an even number (2 epochs)")
    p.add_argument("--loaders", nargs="*", choices=LOADERS, default=list(LOADERS),
                   help="loaders to train with (none: only stop, resume, eval and export)")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2],
                   help="rank counts to check; more ranks than CUDA devices are skipped (default: 1 2)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one train.py process may take")
    p.add_argument("--work-dir", type=Path, help="keep data, runs and logs here (default: a temporary directory)")
    p.add_argument("--syncs-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    batch = a.batch or (64 if a.device == "cuda" else 8)
    if a.syncs_worker:
        syncs_worker(a.device, a.img_size, batch)
        return 0
    if a.steps < 4 or a.steps % 2 or batch % max(a.ranks) or batch % CLASSES:
        p.error(f"--steps {a.steps} / --batch {batch}: expected an even number of steps >= 4 and a batch that "
                f"{CLASSES} classes and {max(a.ranks)} ranks divide")

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("FAIL device: CUDA is not available here (use --device cpu to run these checks on the CPU)")
        return 1
    devices = torch.cuda.device_count() if a.device == "cuda" else None
    what = f"{devices} x {torch.cuda.get_device_name(0)}" if devices else f"{os.cpu_count()} cores"
    print(f"gpu_smoke: {a.device} ({what}), torch {torch.__version__}, "
          f"{'bf16' if a.device == 'cuda' else 'fp32'}, sovit_7 at {a.img_size} px, global batch {batch}, "
          f"{a.steps} steps", flush=True)
    missing = missing_loaders(a.loaders)
    loaders = [n for n in a.loaders if n not in missing]
    with contextlib.ExitStack() as stack:
        work = a.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_smoke-")))
        work.mkdir(parents=True, exist_ok=True)
        smoke = Smoke(work, a.device, a.img_size, batch, a.steps, a.timeout)
        smoke.data = make_data(work, sorted({"torchvision", *loaders}), train_images=a.steps // 2 * batch,
                               val_images=1024 if a.device == "cuda" else 32, size=a.img_size)
        ok = True
        for ranks in a.ranks:
            if devices is not None and ranks > devices:
                print(f"SKIP {ranks} ranks: {devices} CUDA device(s) here", flush=True)
                continue
            ok &= run_checks(smoke, a.loaders, ranks, missing)
    print("all checks passed" if ok else "some checks FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
