"""Peak resident memory of each rank of the real training job, per phase, under ZeRO-1 and ZeRO-3.

    .venv/bin/python -m benchmarks.bench_memory                       # full: >= 200M model, 1/2/4 ranks
    .venv/bin/python -m benchmarks.bench_memory --quick               # smoke: small model, 1 and 2 ranks
    .venv/bin/python -m benchmarks.bench_memory --ranks 1,2 --configs zero3,zero3_offload
    .venv/bin/python -m benchmarks.run_all --only memory

For every DeepSpeed configuration (``zero1``; ``zero3``; ``zero3_offload``:
ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on the CPU; both ZeRO-3
ones with the shipped JSONs' ``"auto"`` bucket, prefetch and reuse sizes, filled
from the model's sizes; on request ``zero3_ds_buckets`` and
``zero3_offload_ds_buckets``: with DeepSpeed's fixed defaults for those five keys
instead, see :func:`ds_config`) and rank count N,
and for two models (the measured one and a tiny one, whose peaks are the
model-independent baseline), it runs what a user runs:

1. ``deepspeed --num_accelerators N run/train.py`` for 2 steps, saving a checkpoint at step 2;
2. the same command with ``--resume`` and ``run.train_steps=3`` (load, 1 step, save);
3. ``run/export.py`` of the newest checkpoint (a single process; it verifies itself by default).

The tiny model's jobs stop after item 1 (train + save): its peaks there are all the ratios subtract.

Every rank of 1 and 2 runs with ``HMOE_DS_MEMORY_LOG`` set, so it reports its
own peak RSS (``VmHWM``, from the kernel) per phase, the high-water mark being
reset between phases (:mod:`hmoe_ds.training.memlog`). Columns, per rank (the
range over ranks when N > 1), MiB:

* ``build``: process start to engine built (imports, data, model under
  ``deepspeed.zero.Init`` for ZeRO-3, ``deepspeed.initialize``), run 1;
* ``train``: the largest optimizer step of runs 1 and 2;
* ``save``: the largest checkpoint save of runs 1 and 2;
* ``resume``: the checkpoint load of run 2;
* ``export``: the whole export process (``ru_maxrss`` of that child, from ``wait4``);
* ``peak``: the job's peak, the largest of every phase of run 1 (build, steps, eval, save):
  what ``VmHWM`` at exit shows.

``model part`` is a rank's ``peak`` minus the same rank's ``peak`` in the
same job with the tiny model. The target (issue 9, ZeRO-3 with and without
offload) is ``ratio = max over ranks of model part at N / (model part at
N=1 / N) <= 1.3``, at N = 2 and 4. ``train ratio`` is the same with the
training peak (``max(build, train)``) instead of the job peak. The checks
``save <= train``, ``resume <= train`` and ``export <= train`` compare each
phase with that training peak (for export: the largest rank's, same N).

Memory hygiene (the machine is shared): one job at a time; the summed RSS of
a job's processes is sampled every 0.2 s and the job is killed when it
exceeds ``--max-total-gib`` (default 12), its row then saying so; every job
runs in its own session and the whole process group is killed when it ends;
``/dev/shm/deepspeed_*`` segments no process holds are removed after each job.
Each job runs with a fixed glibc mmap threshold (as the other memory
benchmarks, :data:`benchmarks.common.WORKER_ENV`), so freed tensors go back
to the OS and RSS tracks live memory, not the allocator's cache.
Results are written (after every job, so an interrupted run keeps what it
measured) to ``outputs/benchmarks/memory.json`` (``memory_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .common import WORKER_ENV, Table

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "run" / "train.py"
EXPORT = REPO / "run" / "export.py"
OUT_DIR = REPO / "outputs" / "benchmarks"
MIB = 1024.0 * 1024.0

CONFIG_NAMES = ("zero3", "zero3_offload", "zero1")  # the targets first: a run cut short still has them
#: Not in the default grid: ZeRO-3 with DeepSpeed's fixed defaults (buckets 5e8 / 5e7 / 1e5, live parameters and
#: reuse distance 1e9) instead of the shipped JSONs' "auto" ones.
EXTRA_CONFIG_NAMES = ("zero3_ds_buckets", "zero3_offload_ds_buckets")
#: The keys ds_configs/zero3*.json set to "auto" (filled from the model's sizes by the trainer).
AUTO_BUCKETS = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": "auto",
                "stage3_max_reuse_distance": "auto"}
TRAIN_STEPS = 2  # run 1: build, 2 steps, save at step 2; run 2 resumes for 1 more step and saves again
TARGET_RATIO = 1.3

#: The measured model: hidden 1024, 12 HMoE layers of 8 arithmetic experts (sizes from solve_expert_sizes,
#: 272-688, total hidden 8 x 480): 200.4M parameters with the default 8192-token tokenizer, each layer 8% of
#: them (deep like the models users train; ZeRO-3 gathers and prefetches layer by layer, so with a handful of
#: layers one layer is a large share of the model). Sequences and micro-batch are tiny (32 tokens x 1) so
#: activations stay negligible against parameters, gradients and optimizer state.
FULL_MODEL: dict[str, Any] = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16,
                              "num_experts": 8, "total_hidden": 8 * 480}
#: --quick's "large" model: small enough that the whole grid runs in minutes (a smoke test of the harness).
QUICK_MODEL: dict[str, Any] = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_experts": 4, "total_hidden": 4 * 256}
#: The baseline: the tests' debug model size (its parameters are a few hundred kB).
TINY_MODEL: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_experts": 4, "total_hidden": 4 * 64}
BLOCK_SIZE = 32


def experiment(model: dict[str, Any], out_dir: Path, cache: Path) -> dict[str, Any]:
    """The experiment YAML (as a dict) of one job: ``model`` sizes, Top-P routing as the quickstart, 2 steps."""
    from hmoe_ds.sizes import solve_expert_sizes

    sizes = solve_expert_sizes(num_experts=model["num_experts"], total_hidden=model["total_hidden"],
                               multiple=64 if model["total_hidden"] >= 64 * 8 * model["num_experts"] else 16)
    return {
        "model": {
            "vocab_size": "auto", "hidden_size": model["hidden_size"],
            "num_hidden_layers": model["num_hidden_layers"], "num_attention_heads": model["num_attention_heads"],
            "max_position_embeddings": BLOCK_SIZE, "dense_intermediate_size": 4 * model["hidden_size"],
            "moe_layer_frequency": 1, "tie_word_embeddings": True,
            "moe": {"expert_sizes": sizes, "routing": "top_p", "top_p": 0.6, "p_penalty_coef": 0.1,
                    "entropy_coef": 0.03},
        },
        # The default corpus and its default 8192-token BPE, cut to 300k characters: plenty of 32-token blocks.
        "data": {"block_size": BLOCK_SIZE, "vocab_size": 8192, "max_chars": 300_000, "cache_dir": str(cache)},
        "run": {"output_dir": str(out_dir), "run_name": "bench_memory", "train_steps": TRAIN_STEPS,
                "log_every": 1, "eval_every": 0, "eval_batches": 1, "eval_at_start": False,
                "save_every": TRAIN_STEPS, "progress_bar": False, "seed": 1234},
    }


def ds_config(name: str) -> dict[str, Any]:
    """The DeepSpeed JSON of configuration ``name``: fp32, micro-batch 1, AdamW, no TensorBoard."""
    zero: dict[str, Any]
    base = name.removesuffix("_ds_buckets")
    buckets = {} if name.endswith("_ds_buckets") else dict(AUTO_BUCKETS)  # as ds_configs/zero3.json
    if name == "zero1":
        zero = {"stage": 1}
    elif base == "zero3":
        zero = {"stage": 3, **buckets}
    elif base == "zero3_offload":
        zero = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False},
                "offload_optimizer": {"device": "cpu", "pin_memory": False}, **buckets}
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIG_NAMES + EXTRA_CONFIG_NAMES)}")
    # Offloaded optimizer state is stepped by DeepSpeed's CPU Adam; otherwise torch's AdamW (no fused CPU kernel).
    adam = {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": "offload_optimizer" not in zero}
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "steps_per_print": 10**6, "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero, "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "tensorboard": {"enabled": False},
    }


def parameter_count(model: dict[str, Any], vocab_size: int = 8192) -> int:
    """Total parameters of ``model`` (analytic, :func:`hmoe_ds.modeling.parameter_summary` of its config)."""
    from hmoe_ds.modeling import HMoEConfig, parameter_summary

    spec = experiment(model, Path("unused"), Path("unused"))["model"]
    cfg = HMoEConfig(**{**{k: v for k, v in spec.items() if k != "vocab_size"}, "vocab_size": vocab_size})
    return int(parameter_summary(cfg)["total_params"])


# --------------------------------------------------------------------------- running one process group


@dataclass
class GroupResult:
    """A finished process group: exit code, its output's tail, and what the OS says about its memory."""

    returncode: int
    output_tail: str
    maxrss_mib: float  # ru_maxrss of the child from wait4: its largest descendant that was waited for
    max_total_rss_mib: float  # largest sampled sum of the group's RSS
    killed: str | None = None  # why the harness killed it (memory cap, timeout)
    seconds: float = 0.0


def _group_rss_mib(pgid: int) -> float:
    """Summed RSS (MiB) of the processes of process group ``pgid`` (shared pages count in each)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields: state ppid pgrp ...
                continue
            with open(f"/proc/{entry}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # exited while being read
    return total / MIB


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def clean_shm() -> None:
    """Remove DeepSpeed shared-memory segments no process holds (a killed job leaves its own behind)."""
    for path in Path("/dev/shm").glob("deepspeed_*"):
        held = subprocess.run(["fuser", "-s", str(path)], stderr=subprocess.DEVNULL, check=False).returncode == 0
        if not held:
            path.unlink(missing_ok=True)


def run_group(cmd: Sequence[str], env: dict[str, str], log: Path, timeout_s: float, cap_mib: float) -> GroupResult:
    """Run ``cmd`` in its own session; kill the whole group at the end, on timeout or above ``cap_mib`` summed RSS."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    killed: str | None = None
    max_total = 0.0
    status, usage = 0, None
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            total = _group_rss_mib(proc.pid)
            max_total = max(max_total, total)
            if killed is None and total > cap_mib:
                killed = f"killed: its processes held {total / 1024:.1f} GiB > --max-total-gib {cap_mib / 1024:.0f}"
                _kill_group(proc.pid)
            elif killed is None and time.monotonic() - start > timeout_s:
                killed = f"killed: timed out after {timeout_s:.0f} s"
                _kill_group(proc.pid)
            time.sleep(0.2)
    finally:
        _kill_group(proc.pid)  # ranks the launcher left behind, and everything on an exception here
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 above; Popen must not wait again
    clean_shm()
    text = log.read_text(errors="replace")
    return GroupResult(proc.returncode, text[-4000:], usage.ru_maxrss / 1024.0 if usage else float("nan"),
                       max_total, killed, time.monotonic() - start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(memlog: Path | None) -> dict[str, str]:
    """This environment, offline, CPU accelerator, one thread per rank (they share the cores), fixed mmap threshold."""
    from hmoe_ds.env import configure_environment

    configure_environment()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HMOE_DS_MEMORY_LOG")}
    env.update(WORKER_ENV, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if memlog is not None:
        env["HMOE_DS_MEMORY_LOG"] = str(memlog)
    return env


# --------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    """Per-rank phase peaks (MiB) of one (configuration, N, model) job; ``error`` when it did not complete."""

    config: str
    ranks: int
    model: str
    phases: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> phase -> peak MiB
    steps: dict[int, int] = field(default_factory=dict)  # run (1, 2) -> last step every rank logged
    export_mib: float = float("nan")
    max_total_rss_mib: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "ranks": self.ranks, "model": self.model,
                "phases": {str(r): p for r, p in self.phases.items()}, "steps": self.steps,
                "export_mib": self.export_mib,
                "max_total_rss_mib": self.max_total_rss_mib, "seconds": round(self.seconds, 1), "error": self.error}


def read_memlog(path: Path, run: int, into: dict[int, dict[str, float]]) -> int:
    """Fold the marks of ``path`` into ``into[rank][phase]`` (largest peak per phase; run 1 and 2 kept apart).

    Returns the last optimizer step every rank logged (0 when none), so a job killed part-way is not
    mistaken for a complete one.
    """
    if not path.exists():
        return 0
    last: dict[int, int] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("reset", False):
            raise RuntimeError(f"{path}: the kernel refused to reset VmHWM (/proc/self/clear_refs); per-phase peaks "
                               "would be cumulative")
        phases = into.setdefault(int(rec["rank"]), {})
        key = f"{rec['phase']}@{run}"
        phases[key] = max(phases.get(key, 0.0), float(rec["vmhwm_mib"]))
        if rec["phase"] == "train":
            last[int(rec["rank"])] = max(last.get(int(rec["rank"]), 0), int(rec["step"]))
    return min(last.values()) if last else 0


def _failure(name: str, result: GroupResult) -> str:
    if result.killed:
        return f"{name} {result.killed}"
    lines = [ln for ln in result.output_tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return f"{name} failed (exit {result.returncode}): {(errors or lines or ['no output'])[-1][:300]}"


def measure(config: str, ranks: int, model_name: str, model: dict[str, Any], work: Path, cache: Path,
            timeout_s: float, cap_mib: float, baseline: bool = False) -> Measurement:
    """Train 2 steps + save, resume 1 step + save, export; per-rank phase peaks. Deletes its run directory.

    ``baseline``: only the first run (train + save), all the ratios need of the tiny model.
    """
    import yaml

    m = Measurement(config, ranks, model_name)
    job = work / f"{config}_n{ranks}_{model_name}"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    exp_file, ds_file, out = job / "experiment.yaml", job / "ds.json", job / "run"
    exp_file.write_text(yaml.safe_dump(experiment(model, out, cache)), encoding="utf-8")
    ds_file.write_text(json.dumps(ds_config(config)), encoding="utf-8")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    base = [str(deepspeed), "--num_accelerators", str(ranks)]
    args = [str(TRAIN), "--config", str(exp_file), "--deepspeed_config", str(ds_file)]
    start = time.monotonic()
    try:
        runs = ((1, []), (2, ["--resume", "--set", f"run.train_steps={TRAIN_STEPS + 1}"]))
        for run, extra in runs[:1] if baseline else runs:
            log = job / f"memlog_{run}.jsonl"
            result = run_group([*base, "--master_port", str(_free_port()), *args, *extra], job_env(log),
                               job / f"train_{run}.log", timeout_s, cap_mib)
            m.max_total_rss_mib = max(m.max_total_rss_mib, result.max_total_rss_mib)
            m.steps[run] = read_memlog(log, run, m.phases)
            if result.killed or result.returncode != 0:
                m.error = _failure("train" if run == 1 else "resume", result)
                return m
        if baseline:
            return m
        result = run_group([sys.executable, str(EXPORT), str(out), str(job / "export")], job_env(None),
                           job / "export.log", timeout_s, cap_mib)
        if result.killed or result.returncode != 0:
            m.error = _failure("export", result)
            return m
        m.export_mib = result.maxrss_mib
        return m
    finally:
        m.seconds = time.monotonic() - start
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of a 200M model are GBs
        shutil.rmtree(job / "export", ignore_errors=True)


def summarise(m: Measurement) -> dict[int, dict[str, float]]:
    """Per rank: build, train, save, resume, peak (job peak of run 1) and train_peak (max(build, train))."""
    nan = float("nan")
    out: dict[int, dict[str, float]] = {}
    for rank, p in sorted(m.phases.items()):
        def biggest(*keys: str) -> float:
            values = [p[k] for k in keys if k in p]
            return max(values) if values else nan
        s = {"build": biggest("build@1"), "train": biggest("train@1", "train@2"), "save": biggest("save@1", "save@2"),
             "resume": biggest("resume@2"), "peak": biggest(*(k for k in p if k.endswith("@1")))}
        s["train_peak"] = max(s["build"], s["train"])
        out[rank] = s
    return out


# --------------------------------------------------------------------------- the tables


def _span(values: Sequence[float]) -> str | float:
    """One value, or 'min-max' over ranks."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan")
    lo, hi = min(vals), max(vals)
    return round(lo, 0) if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def build_tables(results: dict[tuple[str, int, str], Measurement], configs: Sequence[str],
                 ranks: Sequence[int], large: str, params: int) -> list[Table]:
    """One table per configuration (rows: N), plus the targets' summary table."""
    tables: list[Table] = []
    targets: list[list[Any]] = []
    headers = ["N", "build", "train", "save", "resume", "export", "peak", "tiny peak", "model part",
               "ratio", "train ratio", "save<=train", "resume<=train", "export<=train"]
    for config in configs:
        rows: list[list[Any]] = []
        notes: list[str] = []
        single: dict[str, float] = {}  # model part at N=1, job peak and training peak
        for n in ranks:
            big, tiny = results.get((config, n, large)), results.get((config, n, "tiny"))
            if big is None or tiny is None:
                continue
            sb, st = summarise(big), summarise(tiny)
            for mm, sm in ((big, sb), (tiny, st)):
                if mm.error:
                    measured = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items() if v == v)
                                         for r, s in sm.items())
                    notes.append(f"N={n} {mm.model}: {mm.error}"
                                 + (f" (measured before it stopped, MiB: {measured})" if measured else ""))
            # A job killed after its training steps (e.g. in the save) still measured build and training:
            # its training figures stand; everything after the kill is n/a.
            trained = len(sb) == n and big.steps.get(1, 0) >= TRAIN_STEPS
            if tiny.error or not trained:
                rows.append([n] + ["-"] * (len(headers) - 1))
                continue
            nan = float("nan")
            done = big.error is None
            part = {r: (sb[r]["peak"] - st[r]["peak"]) if done else nan for r in sb if r in st}
            train_part = {r: sb[r]["train_peak"] - st[r]["train_peak"] for r in sb if r in st}
            if n == 1:
                single = {"peak": part.get(0, nan), "train": train_part.get(0, nan)}
            ratio = max(part.values()) / (single["peak"] / n) if single and done else nan
            train_ratio = max(train_part.values()) / (single["train"] / n) if single else nan
            train_max = max(s["train_peak"] for s in sb.values())

            def check(phase: str) -> str:
                values = [(s[phase], s["train_peak"]) for s in sb.values()]
                if any(v != v for v, _ in values):
                    return "n/a"
                return "yes" if all(v <= t for v, t in values) else "NO"

            export_check = "n/a" if not done else "yes" if big.export_mib <= train_max else "NO"
            rows.append([
                n, _span([s["build"] for s in sb.values()]), _span([s["train"] for s in sb.values()]),
                _span([s["save"] for s in sb.values()]), _span([s["resume"] for s in sb.values()]),
                round(big.export_mib, 0), _span([s["peak"] for s in sb.values()]) if done else nan,
                _span([s["peak"] for s in st.values()]), _span(list(part.values())),
                round(ratio, 2), round(train_ratio, 2), check("save"), check("resume"), export_check,
            ])
            if config.startswith("zero3") and n > 1:
                verdict = lambda r: "PASS" if r <= TARGET_RATIO else "FAIL" if r == r else "n/a"  # noqa: E731
                targets.append([config, n, round(ratio, 2), verdict(ratio), round(train_ratio, 2),
                                verdict(train_ratio), check("save"), export_check])
        notes += [
            f"{large} model: {params / 1e6:.0f}M parameters; tiny model: the baseline. MiB of resident memory "
            "(VmHWM from the kernel, reset between phases); a range is min-max over ranks",
            "build/train/save/resume/peak per rank of the training job; export: the single export process; "
            "the tiny model's jobs (the baseline) only train and save",
            "model part = peak - tiny peak (same rank); ratio = largest rank's model part / (model part at N=1 / N); "
            "train ratio: the same with max(build, train) instead of the job peak",
        ]
        tables.append(Table(f"Peak resident memory per rank (MiB), {config}", headers, rows, notes))
    tables.append(Table(
        f"ZeRO-3 memory targets (model part <= {TARGET_RATIO} x single-rank / N; save and export <= training peak)",
        ["config", "N", "ratio (job peak)", "target", "ratio (training)", "target", "save<=train", "export<=train"],
        targets, ["ratio (job peak) includes the save phase; ratio (training) covers build and optimizer steps only"]))
    return tables


def prepare_data(cache: Path, work: Path) -> None:
    """Build the corpus' tokenizer and token cache once, unmeasured, so no job's build phase includes it."""
    import yaml

    exp_file = work / "data_experiment.yaml"
    exp_file.write_text(yaml.safe_dump(experiment(TINY_MODEL, work / "unused", cache)), encoding="utf-8")
    code = ("import sys; from hmoe_ds.env import configure_environment; configure_environment(); "
            "from hmoe_ds.training.experiment import load_experiment; from hmoe_ds.data import build_lm_datasets; "
            "build_lm_datasets(load_experiment(sys.argv[1]).data_config())")
    subprocess.run([sys.executable, "-c", code, str(exp_file)], cwd=REPO, env=job_env(None), check=True,
                   capture_output=True, text=True)


def run(quick: bool = False, ranks: Sequence[int] | None = None, configs: Sequence[str] | None = None,
        max_total_gib: float = 12.0, timeout_s: float | None = None, json_path: Path | None = None,
        work_dir: Path | None = None) -> list[Table]:
    """Measure every (configuration, N, model) job; print progress; return the tables (also written as JSON)."""
    ranks = sorted(set(ranks or ((1, 2) if quick else (1, 2, 4))))
    if ranks[0] != 1:
        raise ValueError("--ranks must include 1: the single-rank model part is the reference of the ratio")
    configs = list(configs or (("zero3",) if quick else CONFIG_NAMES))
    large = "small" if quick else "large"
    model = QUICK_MODEL if quick else FULL_MODEL
    params = parameter_count(model)
    if not quick and params < 200_000_000:
        raise RuntimeError(f"the measured model has {params:,} parameters; issue 9 asks for >= 200M")
    timeout_s = timeout_s or (600.0 if quick else 1500.0)
    json_path = json_path or OUT_DIR / ("memory_quick.json" if quick else "memory.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = work_dir or Path(tempfile.mkdtemp(prefix="hmoe_bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    results: dict[tuple[str, int, str], Measurement] = {}
    meta = {"quick": quick, "ranks": ranks, "configs": configs, "params": params, "model": model,
            "tiny_model": TINY_MODEL, "max_total_gib": max_total_gib, "commit": _commit(), "started": time.time()}
    try:
        prepare_data(cache, work)
        for config in configs:
            for n in ranks:
                for name, spec in (("tiny", TINY_MODEL), (large, model)):
                    m = measure(config, n, name, spec, work, cache, timeout_s, max_total_gib * 1024,
                                baseline=name == "tiny")
                    results[(config, n, name)] = m
                    print(f"  memory {config} N={n} {name}: {m.seconds:.0f} s"
                          + (f", {m.error}" if m.error else
                             f", job peak {_span([s['peak'] for s in summarise(m).values()])} MiB/rank"
                             + (f", export {m.export_mib:.0f} MiB" if name != "tiny" else "")), flush=True)
                    tables = build_tables(results, configs, ranks, large, params)
                    json_path.write_text(json.dumps(
                        {**meta, "measurements": [r.as_dict() for r in results.values()],
                         "tables": [t.as_dict() for t in tables]}, indent=1, default=str))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return build_tables(results, configs, ranks, large, params)


def render(paths: Sequence[Path]) -> list[Table]:
    """The tables of earlier runs' results files (merged: e.g. the default grid and the ``_ds_buckets`` variants)."""
    results: dict[tuple[str, int, str], Measurement] = {}
    configs: list[str] = []
    ranks: set[int] = set()
    large, params = "large", 0
    for path in paths:
        data = json.loads(Path(path).read_text())
        large, params = ("small" if data["quick"] else "large"), int(data["params"])
        for d in data["measurements"]:
            m = Measurement(d["config"], int(d["ranks"]), d["model"],
                            {int(r): p for r, p in d["phases"].items()}, {int(k): v for k, v in d["steps"].items()},
                            float(d["export_mib"]), float(d["max_total_rss_mib"]), float(d["seconds"]), d["error"])
            results[(m.config, m.ranks, m.model)] = m
            configs += [m.config] if m.config not in configs else []
            ranks.add(m.ranks)
    return build_tables(results, configs, sorted(ranks), large, params)


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model instead of the >= 200M one; N = 1, 2; zero3")
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts, must include 1 (default 1,2,4)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from {','.join(CONFIG_NAMES + EXTRA_CONFIG_NAMES)} "
                             f"(default {','.join(CONFIG_NAMES)}; --quick: zero3)")
    parser.add_argument("--max-total-gib", type=float, default=12.0,
                        help="kill a job whose processes together hold more resident memory (default 12)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per launched command")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default outputs/benchmarks/memory*.json)")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="measure nothing: print the tables of these results files (merged)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep each job's configs and logs here (default: a temporary directory, deleted)")
    args = parser.parse_args(argv)
    if args.render:
        for table in render(args.render):
            print(table.render() + "\n", flush=True)
        return 0
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    configs = args.configs.split(",") if args.configs else None
    for c in configs or ():
        if c not in CONFIG_NAMES + EXTRA_CONFIG_NAMES:
            parser.error(f"--configs: unknown {c!r}; choose from {', '.join(CONFIG_NAMES + EXTRA_CONFIG_NAMES)}")
    tables = run(args.quick, ranks, configs, args.max_total_gib, args.timeout, args.json, args.work_dir)
    for table in tables:
        print(table.render() + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
