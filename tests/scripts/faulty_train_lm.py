"""examples/train_lm.py with a fault injected on the launcher's first attempt only.

    FAULT_RANK=1 FAULT_STEP=6 FAULT=kill|stop|raise python faulty_train_lm.py [train_lm args]

When rank FAULT_RANK logs step FAULT_STEP (after that step's optimizer update, before its
checkpoint) it SIGKILLs itself, SIGSTOPs itself (a hang) or raises. DISTRIB_RESTART_COUNT
(set by the launcher) > 0 means a restarted attempt: no fault then, unless FAULT_EVERY_ATTEMPT=1.
"""
import os
import signal
import sys
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
            raise RuntimeError(f"injected failure at step {step}")
    return _log_step(self, step, **kw)


distrib.metrics.MetricsLogger.step = _faulty_step

import train_lm  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_lm.cli())
