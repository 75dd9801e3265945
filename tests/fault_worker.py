"""Kill-and-resume fault injection, run by tests/test_faults.py in its own process.

For every kill point: a child process (forked from this one, which has imported torch but run
nothing, so the fork is safe) trains with the fault installed and is SIGKILLed at that exact
moment; a second child resumes with resume_from_checkpoint=True and finishes. The result must
equal an uninterrupted run bit for bit: the adapter, and every logged (step, loss, grad norm).

Usage: python tests/fault_worker.py WORKDIR [POINT ...]   (no points: all of them)
Prints one JSON line per point and exits non-zero if any point failed.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftloop.callbacks  # noqa: E402
import peftloop.checkpoint as ckpt  # noqa: E402
import peftloop.files as files  # noqa: E402
from peftloop.config import TrainConfig  # noqa: E402
from peftloop.train import train  # noqa: E402
from tests.helpers import lora_model, read_log, toy_examples  # noqa: E402

STEPS = 9


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def run_training(out: Path, resume: bool) -> int:
    torch.set_num_threads(1)
    model = lora_model(lora_dropout=0.1, init_lora_weights=True)
    data = toy_examples(20, seed=1)
    config = TrainConfig(output_dir=str(out), micro_batch_size=3, grad_accum=2, max_steps=STEPS, save_every=2,
                         save_total_limit=2, eval_every=3, learning_rate=5e-3, warmup_steps=2,
                         lr_scheduler="cosine", weight_decay=0.01,
                         resume_from_checkpoint=True if resume else None, progress_bar=False)
    return train(model, data, data[:4], config).global_step


def nth_call(n, action):
    """A wrapper factory: the n-th call of the wrapped function runs `action` (which kills) first."""
    count = {"calls": 0}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            count["calls"] += 1
            if count["calls"] == n:
                action(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapped
    return wrap


def partial_write_then_die(path_arg):
    """Write a torn file at the destination (half of what the real write would produce), then die."""
    def action(*args, **kwargs):
        target = Path(args[path_arg] if len(args) > path_arg else kwargs["filename"])
        target.write_bytes(b"\x00" * 37)
        die()
    return action


def install(point: str) -> None:
    """Arm one kill point in this (child) process."""
    kind, _, n = point.partition(":")
    n = int(n or 1)
    if kind == "forward":  # mid-step: inside the forward pass of a decoder layer
        from peftloop.models.llama import DecoderLayer

        DecoderLayer.forward = nth_call(n, lambda *a, **k: die())(DecoderLayer.forward)
    elif kind == "backward":  # mid-step: inside backward
        ll = sys.modules["peftloop.kernels.lora_linear"]  # the package re-exports a function of that name

        backward = nth_call(n, lambda *a, **k: die())(ll.LoRALinearFunction.backward)
        ll.LoRALinearFunction.backward = staticmethod(backward)
    elif kind == "optimizer":  # after backward, before the update
        torch.optim.AdamW.step = nth_call(n, lambda *a, **k: die())(torch.optim.AdamW.step)
    elif kind == "save_file":  # mid-save: a torn safetensors file
        files.save_file = nth_call(n, partial_write_then_die(1))(files.save_file)
    elif kind == "json":  # mid-save: a torn JSON file
        ckpt.write_json = nth_call(n, partial_write_then_die(0))(ckpt.write_json)
    elif kind == "manifest":  # everything written but the manifest
        ckpt._write_manifest = nth_call(n, lambda *a, **k: die())(ckpt._write_manifest)
    elif kind == "fsync":  # written and manifested, not yet synced or renamed
        files._fsync_tree = nth_call(n, lambda *a, **k: die())(files._fsync_tree)
    elif kind == "rename":  # between the temporary folder being complete and its rename
        files.os.rename = nth_call(n, lambda *a, **k: die())(files.os.rename)
    elif kind == "renamed":  # just after a rename
        real = files.os.rename
        count = {"calls": 0}

        def rename_then_die(src, dst):
            real(src, dst)
            count["calls"] += 1
            if count["calls"] == n:
                die()
        files.os.rename = rename_then_die
    elif kind == "rotate":  # deleting an old checkpoint: one file gone, then death
        def half_delete(path, *a, **k):
            files = sorted(Path(path).iterdir())
            files[0].unlink()
            die()
        ckpt.shutil.rmtree = nth_call(n, half_delete)(ckpt.shutil.rmtree)
    elif kind == "log":  # a torn line in log.jsonl
        def torn(self, record):
            with self.path.open("a") as f:
                f.write(json.dumps(record)[:10])
            die()
        peftloop.callbacks.JsonlLogger._write = nth_call(n, torn)(peftloop.callbacks.JsonlLogger._write)
    else:
        raise ValueError(f"unknown kill point {point!r}")


POINTS = [
    "forward:1", "forward:9", "forward:23", "forward:30",
    "backward:5", "backward:60", "backward:150",
    "optimizer:1", "optimizer:4", "optimizer:9",
    "save_file:1", "save_file:2", "save_file:6", "save_file:12",
    "json:1", "json:5",
    "manifest:1", "manifest:3",
    "fsync:2",
    "rename:1", "rename:3",
    "renamed:2",
    "rotate:1",
    "log:4", "log:11",
]


def in_child(fn, *args) -> int:
    """Run fn in a forked child; return its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            print(f"child failed: {e!r}", file=sys.stderr, flush=True)
            os._exit(3)
    return os.waitpid(pid, 0)[1]


def killed_run(out: Path, point: str):
    install(point)
    run_training(out, resume=True)


def logged(out: Path):
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in read_log(out)]


def main():
    work = Path(sys.argv[1])
    points = sys.argv[2:] or POINTS
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    assert in_child(run_training, work / "reference", False) == 0
    reference = ckpt.read_safetensors(work / "reference" / "adapter" / "adapter_model.safetensors")
    reference_log = logged(work / "reference")
    failures = 0
    for point in points:
        out = work / point.replace(":", "_")
        status = in_child(killed_run, out, point)
        report = {"point": point, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}
        newest = ckpt.latest_checkpoint(out)
        report["resumed_from"] = newest.name if newest else None
        status = in_child(run_training, out, True)
        report["resume_exit"] = os.waitstatus_to_exitcode(status)
        if report["resume_exit"] == 0:
            adapter = ckpt.read_safetensors(out / "adapter" / "adapter_model.safetensors")
            report["adapter_equal"] = adapter.keys() == reference.keys() and all(
                torch.equal(adapter[k], reference[k]) for k in reference)
            report["log_equal"] = logged(out) == reference_log
            report["leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        ok = (report["killed"] and report["resume_exit"] == 0 and report["adapter_equal"]
              and report["log_equal"] and not report["leftovers"])
        report["ok"] = bool(ok)
        failures += not ok
        print(json.dumps(report), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
