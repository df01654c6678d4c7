"""Subprocess target of the fault-injection tests: a small bilevel run that prints each step.

Usage: python -m tests._fault_driver RUN_DIR STEPS
"""

import sys
import time

import torch

from reweight.bilevel import run_bilevel
from reweight.config import RunConfig
from reweight.hypergrad import ConjugateGradient
from reweight.runs import RunDir
from tests.conftest import make_problem


def main(run_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    problem = make_problem(n=90, seed=7)
    run = RunDir(run_dir, RunConfig(name="fault", outer=RunConfig().outer.__class__(steps=steps)))

    def hook(row, alpha):
        print(f"step {row['step']}", flush=True)
        time.sleep(0.02)

    out = run_bilevel(problem, ConjugateGradient(rtol=1e-10), steps, 0.2, grad_tol=1e-12, checkpoint_every=1, run=run,
                      on_step=hook)
    run.write_text("weights.txt", "\n".join(f"{v:.17g}" for v in out.alpha.tolist()) + "\n")
    run.finish({"final_val_loss": float(problem.val_loss(out.W)), "resumed_from": out.resumed_from})
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
