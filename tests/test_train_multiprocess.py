"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch.

Tolerances: the per-step losses agree to 1e-5 relative (the gradient all-reduce only changes the
order of float additions); weights after 3 AdamW steps at lr 1e-3 agree to 1e-4 absolute (Adam
divides by the gradient's magnitude, which amplifies rounding where a gradient is ~0).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from test_train_common import run_training, subprocess_env, unet_stage, write_yaml

pytestmark = pytest.mark.slow  # every test here starts torchrun

# Each rank writes its own copy of the trained weights (the checkpoint only holds rank 0's) and its pid.
DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from ldm.train import stage_unet
    from ldm.train.commands import main

    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    real_finish = stage_unet.UNetStage.finish

    def finish(self):
        state = self.accelerator.unwrap_model(self.unet).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(self.output_dir / f"rank{self.accelerator.process_index}.safetensors"))
        real_finish(self)

    stage_unet.UNetStage.finish = finish
    sys.exit(main(sys.argv[1:]))
""")


def torchrun(tmp_path, config: dict, out, *extra: str) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           "train", str(write_yaml(config, tmp_path / "c.yaml")), "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def log_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, one_thread):
    from safetensors.torch import load_file

    cfg = unet_stage(train={"max_steps": 3, "batch_size": 2, "checkpoint_every": 10}, data={"caption_dropout": 0.2},
                     optim={"learning_rate": 1e-3})
    proc = torchrun(tmp_path, cfg, tmp_path / "ddp")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "2 process(es) x batch 2" in output
    ranks = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks disagree on {k}"

    single = tmp_path / "single"
    run_training(cfg, single, overrides=["train.batch_size=4"])
    assert log_losses(tmp_path / "ddp") == pytest.approx(log_losses(single), rel=1e-5)
    # lr 1e-3 for 3 steps moves weights by up to ~3e-3: a rank training on its own half would be that far off
    from ldm.io.model_files import load_model

    trained = load_model(single).unet.state_dict()
    apart = max((trained[k] - ranks[0][k]).abs().max().item() for k in trained)
    assert apart < 1e-4, apart


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    cfg = unet_stage(train={"max_steps": 100000, "batch_size": 2, "checkpoint_every": 1000})
    out = tmp_path / "ddp"
    proc = torchrun(tmp_path, cfg, out)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 2/" in line:
                os.kill(int((out / "pid1").read_text()), signal.SIGTERM)  # rank 1 only
                break
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines[-40:])
    finally:
        proc.kill()
    text = "".join(lines)
    assert "received SIGTERM" in text and "stopped at step" in text
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "training_state.json").read_text())
    assert state["world_size"] == 2 and 2 <= state["progress"]["step"] < 100000
    # both ranks saved their RNG state into the same checkpoint, then both exited cleanly
    assert {p.name for p in ckpts[0].glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
