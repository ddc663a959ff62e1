"""The README's plain torchrun loop (HF model + LoRDO + BLADE), run as written under a
2-process torchrun (gloo): both ranks finish with identical weights (the last step is a LoRDO
sync) after training on different shards."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _loop_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Hugging Face integrations"):]
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
              if "torchrun" in b and "LoRDO(" in b and "BLADE(" in b]
    assert blocks, "README's Hugging Face section lost its torchrun loop"
    return blocks[0]


def test_readme_torchrun_loop_two_ranks(tmp_path):
    from thresher.comm.collectives import free_port

    script = tmp_path / "loop.py"
    script.write_text(_loop_block() + (
        "\ntorch.save([p.detach() for p in model.parameters()], f'params{rank}.pt')\n"
        "assert opt.comm_bytes > 0 and blade.syncs == 2\n"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), str(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
