"""Data-parallel training: 2 CPU processes through torchrun (gloo) end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nnlab.engine.metrics import read_jsonl

SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch
    from nnlab.engine import distributed as D
    from nnlab.engine.train import TrainConfig, train

    out = sys.argv[1]
    cfg = TrainConfig(epochs=2, batch_size=16, train_limit=128, test_limit=50, log_every=2,
                      checkpoint_every=3, progress=False, device="cpu")
    res = train(cfg, out + "/run")
    r = D.rank()
    torch.save(res.model.state_dict(), f"{out}/rank{r}.pt")
    info = {"world_size": D.world_size(), "summary": res.summary}
    del res
    D.shutdown()
    # after shutdown no DDP wrapper (whose reducer holds the process group) may outlive the group
    info["ddp_alive"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    json.dump(info, open(f"{out}/rank{r}.json", "w"))
""")


def _torchrun(tmp_path, script_text: str, timeout: int) -> subprocess.CompletedProcess:
    """Run ``script_text`` as 2 single-threaded CPU processes under torchrun, with tmp_path as argv[1]."""
    script = tmp_path / "job.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    out = _torchrun(tmp_path, SCRIPT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in info] == [2, 2]
    assert [i["ddp_alive"] for i in info] == [0, 0]  # torn down while Python was alive (distributed.shutdown)
    # both ranks see the evaluation reduced over the whole test set, so they agree exactly
    assert info[0]["summary"]["test_top1"] == info[1]["summary"]["test_top1"]
    assert info[0]["summary"]["steps"] == 8  # 128 images / 16 per batch / 2 ranks = 4 steps per epoch
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_top1"] == info[0]["summary"]["test_top1"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]  # rank 0 alone writes
    assert [r["test_count"] for r in records if "test_top1" in r] == [50, 50]


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nnlab.engine import distributed as D
    from nnlab.engine.train import Callback, TrainConfig, train

    class Kill(Callback):
        def __init__(self, at):
            self.at = at

        def on_step_end(self, ctx):
            if ctx.step == self.at:
                raise SystemExit(3)

    out, name, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    cfg = TrainConfig(epochs=2, batch_size=16, train_limit=192, test_limit=50, log_every=1,
                      checkpoint_every=2, augment=True, progress=False, device="cpu")
    res = train(cfg, f"{out}/{name}", resume=resume, callbacks=[Kill(kill_at)])
    torch.save(res.model.state_dict(), f"{out}/{name}-rank{D.rank()}.pt")
    D.shutdown()
""")


@pytest.mark.slow
def test_two_process_run_resumes_bit_identically(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name, kill_at, resume):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), name, str(kill_at), str(int(resume))]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)

    assert launch("ref", 0, False).returncode == 0
    assert launch("cut", 9, False).returncode != 0  # killed at step 9 of 12; checkpoint at step 8
    out = launch("cut", 0, True)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in (0, 1):
        a, b = torch.load(tmp_path / f"ref-rank{r}.pt"), torch.load(tmp_path / f"cut-rank{r}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)

    def strip(path):
        return [{k: v for k, v in rec.items() if k not in ("epoch_time_s", "images_per_s")}
                for rec in read_jsonl(path)]

    assert strip(tmp_path / "ref" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")


FUNCTA_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from nnlab.engine import distributed as D
    from nnlab.functa import trainer
    from nnlab.functa.presets import get_preset

    out = sys.argv[1]
    D.init_from_env("cpu")
    r = D.rank()
    # the flat all-reduce: each tensor gets its own mean over ranks
    parts = [torch.full((3,), float(r + 1)), torch.full((2, 2), 10.0 * (r + 1)), torch.tensor([r * 4.0])]
    D.all_reduce_mean_flat(parts)
    checks = {"flat": [p.tolist() for p in parts], "max": D.agree_max(float(r))}
    real, seen = trainer.meta_step, {}
    def slow_on_rank1(state, x, cfg, runner=None):  # rank 1's clock runs ahead of rank 0's
        seen["state"] = state
        if r == 1:
            time.sleep(0.01)
        return real(state, x, cfg, runner)
    trainer.meta_step = slow_on_rank1
    preset = get_preset("tiny", steps=10_000, time_limit_min=0.05, schedule="cosine", val_every=10_000,
                        ckpt_every=10_000, log_every=5)
    s = trainer.train_functa(preset, "mnist-5k", out + "/run", device="cpu", progress=False)
    torch.save(seen["state"].model.state_dict(), out + f"/rank{r}.pt")
    json.dump({"checks": checks, "steps": s["steps"]}, open(out + f"/rank{r}.json", "w"))
    D.shutdown()
""")


def test_functa_time_limited_run_on_two_processes_stays_in_step(tmp_path):
    """Under torchrun a time-limited, cosine-scheduled functa run must use one clock on every rank:
    with each rank's own clock the slower rank stops first (the job ends in a gloo error when the
    other's all-reduce loses its peer) and the ranks' learning rates, hence weights, drift apart."""
    out = _torchrun(tmp_path, FUNCTA_SCRIPT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["checks"] == {"flat": [[1.5] * 3, [[15.0, 15.0], [15.0, 15.0]], [2.0]], "max": 1.0}
    assert info[0]["steps"] == info[1]["steps"] > 5
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == info[0]["steps"] and summary["world_size"] == 2
