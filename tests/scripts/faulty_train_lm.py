"""examples/train_lm.py with a fault injected on the launcher's first attempt only.

    FAULT_RANK=1 FAULT_STEP=6 FAULT=kill|stop|raise python faulty_train_lm.py [train_lm args]

When rank FAULT_RANK logs step FAULT_STEP (after that step's optimizer update, before its
checkpoint; with FAULT_WHERE=backward: at the backward of step FAULT_STEP, inside the script's
loop body, so that its peers fail in that step's gradient allreduce) it SIGKILLs itself, SIGSTOPs itself (a hang) or raises. With FAULT_SLOW_EXIT=S a
rank that raised lingers S seconds after Horovod's shutdown (as a big job finalising does), so its
peers die of the follow-on error first and mpirun kills it before its shim can say how it ended.
DISTRIB_RESTART_COUNT (set by the launcher) > 0 means a restarted attempt: no fault then, unless
FAULT_EVERY_ATTEMPT=1.
"""
import atexit
import os
import signal
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import distrib.metrics  # noqa: E402

_log_step = distrib.metrics.MetricsLogger.step


def _faulty_step(self, step, **kw):
    first_attempt = os.environ.get("DISTRIB_RESTART_COUNT", "0") == "0"
    if (step == int(os.environ["FAULT_STEP"]) and self.ctx.rank == int(os.environ["FAULT_RANK"])
            and (first_attempt or os.environ.get("FAULT_EVERY_ATTEMPT") == "1")):
        fault = os.environ["FAULT"]
        print(f"fault: {fault} on rank {self.ctx.rank} at step {step}", file=sys.stderr, flush=True)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            _raised.append(step)
            raise RuntimeError(f"injected failure at step {step}")
    return _log_step(self, step, **kw)


distrib.metrics.MetricsLogger.step = _faulty_step
_raised = []

import distrib.optim  # noqa: E402

_backward = distrib.optim.DistributedOptimizer.backward
_backwards_done = []


def _faulty_backward(self, loss, **kw):
    _backwards_done.append(1)
    if (len(_backwards_done) == int(os.environ["FAULT_STEP"]) and self.ctx.rank == int(os.environ["FAULT_RANK"])
            and os.environ.get("DISTRIB_RESTART_COUNT", "0") == "0"):
        print(f"fault: kill on rank {self.ctx.rank} in backward {len(_backwards_done)}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return _backward(self, loss, **kw)


if os.environ.get("FAULT_WHERE") == "backward":
    distrib.optim.DistributedOptimizer.backward = _faulty_backward


def _linger_after_horovod_shutdown():
    if _raised:
        time.sleep(float(os.environ.get("FAULT_SLOW_EXIT", "0")))


# atexit runs handlers last-registered first: this one, registered before hvd.init() registers
# Horovod's shutdown, runs after it.
atexit.register(_linger_after_horovod_shutdown)

import train_lm  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_lm.cli())
