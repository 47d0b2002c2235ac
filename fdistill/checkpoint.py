"""Atomic safetensors checkpoints, rotation, and exact resume of every piece of training state.

A checkpoint is a folder ``ckpt-<generator step>/`` holding
  <name>.safetensors            one per module (generator, fake_score, discriminator, ema_<decay>, ratio ...)
  optim_<name>.safetensors      optimizer tensors, flattened (state.<param index>.<key>)
  optim_<name>.json             optimizer param groups and non-tensor state
  rng_rank<k>.safetensors/.json every process's RNG states (torch CPU/CUDA, the training generator, numpy, python)
  meta.json                     counters and the config, written last
It is written to ``ckpt-<step>.tmp`` and renamed when complete, so a crash leaves either the previous
checkpoint or the new one, never half of one. No pickle is ever written or read.

No checkpoint is written with a non-finite tensor, and resuming verifies the newest checkpoint (every file
readable, every tensor finite) and falls back to the previous one, with a warning, when it is damaged; the
rotation only ever removes checkpoints older than the one just written, which passed that check.
A run directory is held by one process at a time: ``run.lock`` names its pid and host.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import FdistillError, RunDirectoryError, RunLocked

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
LOCK_NAME = "run.lock"


class CheckpointError(FdistillError, RuntimeError):
    """A checkpoint that is missing, damaged or does not match the model; the message names the file."""


def nonfinite_tensors(sd: dict) -> list[str]:
    """Names of the floating-point tensors in ``sd`` holding a NaN or an infinity."""
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def check_finite(sd: dict, what: str, fix: str = "") -> None:
    """Raise CheckpointError when a tensor of ``sd`` (the weights of ``what``) is not finite."""
    bad = nonfinite_tensors(sd)
    if bad:
        raise CheckpointError(f"{what} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. "
                              f"{bad[0]!r}: the training that wrote it diverged" + (f"; {fix}" if fix else ""))


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def save_module(module, path: Path):
    """A module, or a state dict already gathered from one (FSDP: the full tensors, on the main process)."""
    sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
    # safetensors refuses tensors sharing memory; clone so tied weights save as copies
    save_file({k: v.clone() for k, v in _contiguous(sd).items()}, str(path))


def load_module(module: torch.nn.Module, path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete or from another "
                              "configuration; delete the folder to start over or point to another run")
    try:
        sd = load_file(str(path))
    except Exception as e:  # corrupt file
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt; remove this checkpoint folder to "
                              "resume from the previous one") from None
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensors of other shapes: networks built with other settings
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        run = path.parent.parent
        raise CheckpointError(f"{path} does not fit the network this config builds ({first}). The run was made "
                              "with other settings, or by an older fdistill whose defaults differed: resume it "
                              f"with its own config (fdistill distill {run / 'config.yaml'} out={run})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not match the model: missing {list(missing)[:5]}, unexpected "
                              f"{list(unexpected)[:5]}. Was the run started with a different config?")


def _optim_flat(opt) -> tuple[dict, dict]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors, rest = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                # a contiguous copy: a gathered (FSDP1) state holds views of one buffer, and the state of a
                # channels_last parameter has its strides; safetensors refuses both
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().clone(memory_format=torch.contiguous_format)
            else:
                rest["state"].setdefault(str(idx), {})[k] = v
    return tensors, rest


def save_optimizer(opt, folder: Path, name: str):
    tensors, rest = _optim_flat(opt)
    save_file(tensors, str(folder / f"optim_{name}.safetensors"))
    (folder / f"optim_{name}.json").write_text(json.dumps(rest))


def read_optimizer(folder: Path, name: str) -> dict:
    """The state dict of ``optim_<name>`` as ``torch.optim.Optimizer.state_dict()`` gives it (keys: indices)."""
    try:
        tensors = load_file(str(folder / f"optim_{name}.safetensors"))
        rest = json.loads((folder / f"optim_{name}.json").read_text())
    except Exception as e:
        raise CheckpointError(f"cannot read optimizer state {name!r} in {folder}: {e}") from None
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, st in rest["state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = rest["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def merge_optim_states(sds: list[dict]) -> dict:
    """Several optimizers' state dicts as one over the concatenation of their parameters (indices offset), e.g.
    the fake score's and the discriminator's as the critic's."""
    state, groups, offset = {}, [], 0
    for sd in sds:
        n = sum(len(g["params"]) for g in sd["param_groups"])
        state.update({int(i) + offset: st for i, st in sd["state"].items()})
        groups += [{**g, "params": [int(i) + offset for i in g["params"]]} for g in sd["param_groups"]]
        offset += n
    return {"state": state, "param_groups": groups}


def split_optim_state(sd: dict, counts: list[int]) -> list[dict]:
    """Inverse of merge_optim_states for optimizers of ``counts`` parameters each; a group that spans several
    parts (a checkpoint written with one optimizer for all of them) is split into one group per part."""
    total = sum(len(g["params"]) for g in sd["param_groups"])
    if total != sum(counts):
        raise CheckpointError(f"optimizer state covers {total} parameters, the networks have {sum(counts)}: "
                              "was the run started with a different config?")
    parts, lo = [], 0
    for n in counts:
        hi = lo + n
        groups = [{**g, "params": [int(i) - lo for i in g["params"] if lo <= int(i) < hi]} for g in sd["param_groups"]]
        parts.append({"state": {int(i) - lo: st for i, st in sd["state"].items() if lo <= int(i) < hi},
                      "param_groups": [g for g in groups if g["params"]]})
        lo = hi
    return parts


def optim_state_by_index(sd: dict, names: list[str]) -> dict:
    """A state dict keyed by parameter names (torch.distributed.checkpoint's, as FSDP gives it) keyed by the
    parameters' indices in ``names`` instead, the order the optimizer was built with: what a plain
    ``Optimizer.state_dict()`` holds, so a checkpoint is the same whether or not the run was sharded."""
    index = {n: i for i, n in enumerate(names)}
    try:
        return {"state": {index[k]: v for k, v in sd["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in sd["param_groups"]]}
    except KeyError as e:
        raise CheckpointError(f"optimizer state names parameter {e}, which the network does not have") from None


def optim_state_by_name(sd: dict, names: list[str]) -> dict:
    """Inverse of optim_state_by_index."""
    return {"state": {names[int(i)]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}


def rng_state(train_rng: torch.Generator | None) -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    if train_rng is not None:
        tensors["train_rng"] = train_rng.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, train_rng: torch.Generator | None):
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    if train_rng is not None and "train_rng" in tensors:
        train_rng.set_state(tensors["train_rng"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(Path(run_dir))
    return ckpts[-1] if ckpts else None


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create the temporary folder of ckpt-<step> (main process). Every process then writes its RNG files."""
    tmp = Path(run_dir) / f"ckpt-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int, train_rng: torch.Generator | None):
    tensors, rmeta = rng_state(train_rng)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rmeta))


def finish_checkpoint(tmp: Path, modules: dict, optimizers: dict, meta: dict, keep: int = 2) -> Path:
    """Write the modules, optimizers and meta.json (last), then rename the folder into place and rotate.
    Values are modules / optimizers, or their (full, gathered) state dicts. Nothing is written when a tensor is
    not finite (CheckpointError): the previous checkpoint stays the newest."""
    for name, m in modules.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        check_finite(sd, f"{name} at {tmp.name[:-len('.tmp')]}", "not writing this checkpoint; the previous one "
                     "is intact: lower the learning rates (optim.lr_gen, optim.lr_critic) and start a new run")
    for name, m in modules.items():
        save_module(m, tmp / f"{name}.safetensors")
    for name, o in optimizers.items():
        save_optimizer(o, tmp, name)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():  # flush before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    step = int(CKPT_RE.match(final.name).group(1))
    for old in list_checkpoints(tmp.parent)[:-keep] if keep > 0 else []:
        if int(CKPT_RE.match(old.name).group(1)) < step:  # never the one just written (checked above)
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, step: int, modules: dict, optimizers: dict, meta: dict,
                    train_rng: torch.Generator | None = None, keep: int = 2) -> Path:
    """Single-process convenience: begin, write this process's RNG, finish."""
    tmp = begin_checkpoint(run_dir, step)
    write_rng(tmp, 0, train_rng)
    return finish_checkpoint(tmp, modules, optimizers, meta, keep)


def read_meta(folder: Path, world_size: int) -> dict:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except Exception as e:
        raise CheckpointError(f"cannot read {folder / 'meta.json'}: {e}") from None
    if meta.get("world_size", 1) != world_size:
        raise CheckpointError(f"{folder} was written by {meta.get('world_size')} processes but this run has "
                              f"{world_size}; resume with the same number of processes (the RNG streams are "
                              "per process)")
    return meta


def load_rng(folder: Path, rank: int, train_rng: torch.Generator | None):
    rpath = Path(folder) / f"rng_rank{rank}.safetensors"
    if rpath.is_file():
        set_rng_state(load_file(str(rpath)), json.loads((Path(folder) / f"rng_rank{rank}.json").read_text()),
                      train_rng)


def verify_checkpoint(folder: Path, world_size: int) -> None:
    """Raise CheckpointError naming the first problem of checkpoint ``folder``: a file missing or unreadable (the
    optimizers' and every process's RNG files included) or a tensor that is not finite. Reads every tensor once."""
    folder = Path(folder)
    read_meta(folder, world_size)
    for name in ["optim_gen.json", "optim_critic.json"] + [f"rng_rank{k}.json" for k in range(world_size)]:
        path = folder / name
        if name.startswith("optim_") and not any(folder.glob("optim_*")):
            continue  # a checkpoint of modules only (save_checkpoint without optimizers)
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is missing or unreadable ({type(e).__name__})") from None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise CheckpointError(f"{path} holds non-finite values in {key!r}")
        except CheckpointError:
            raise
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"{path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None


def latest_verified_checkpoint(run_dir: Path, world_size: int, warn=None) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``; each damaged newer one is named in
    a warning (``warn``, default: stderr) and skipped. CheckpointError when checkpoints exist and none passes;
    a world-size mismatch is raised at once (no older checkpoint can fix it)."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    ckpts = list_checkpoints(Path(run_dir))
    problems = []
    for folder in reversed(ckpts):
        read_meta(folder, world_size)  # the process count is a setting, not damage
        try:
            verify_checkpoint(folder, world_size)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for p in problems:
            warn(f"{p}; resuming from the previous checkpoint {folder.name} instead")
        return folder
    if ckpts:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}. Remove the damaged "
                              "ckpt-* folders to start over, or choose another out=DIR")
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of a metrics.jsonl up to generator step ``step``: on resume the rows written between that
    checkpoint and the end of the previous process would otherwise be logged twice."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut short by the kill
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def acquire_run_lock(run_dir: Path) -> Path:
    """Take ``run_dir/run.lock`` (pid and host) for this process. Another live holder on this host, or any holder
    on another host, is refused (RunLocked); a lock left by a process that is gone is taken over. Call
    ``release_run_lock`` when done."""
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            if isinstance(e, FileExistsError) and lock.exists():
                pass  # held: read below
            else:
                raise RunDirectoryError(f"cannot write to the run directory {run_dir} ({type(e).__name__}: "
                                        f"{e.strerror}); make it writable or choose another out=DIR") from None
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = None, -1, me["host"]  # unreadable: left half-written by a crash
            if holder is not None and (host != me["host"] or (pid != me["pid"] and _pid_alive(pid))):
                raise RunLocked(f"{run_dir} is in use by process {pid} on {host} (lock file {lock}); wait for it "
                                "to finish or choose another out=DIR. If no such process runs, delete the lock "
                                "file") from None
            lock.unlink(missing_ok=True)  # stale (its process is gone) or our own: take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunLocked(f"could not take the lock {lock}: another process keeps taking it")


def release_run_lock(run_dir: Path) -> None:
    """Remove ``run_dir/run.lock`` if this process holds it."""
    lock = Path(run_dir) / LOCK_NAME
    try:
        if int(json.loads(lock.read_text())["pid"]) == os.getpid():
            lock.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass
