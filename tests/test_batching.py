"""The cap on BentoML's learned adaptive-batching wait (service/batching.py).

Runs in a subprocess: the cap patches BentoML's dispatcher class for the whole process.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT, base_env

SCRIPT = r"""
from bentoml._internal.marshal.dispatcher import Optimizer
from service.bentoml_compat import cap_learned_wait

def learned(optimizer):
    for n in range(1, 60):  # batches whose first request queued 400 ms (a burst)
        optimizer.log_outbound(n=n % 8 + 1, wait=0.4, duration=0.01 * (n % 8 + 1))
    optimizer.trigger_refresh()
    return optimizer.wait

assert abs(learned(Optimizer(30.0)) - 0.4) < 1e-9      # BentoML alone: holds lone requests 0.4 s
cap_learned_wait(0.005)
capped = Optimizer(30.0)
assert learned(capped) == 0.005, capped.wait
assert capped.o_a > 0                                    # the latency model is still learned
cap_learned_wait(0.02)                                   # a second call moves the cap
assert learned(Optimizer(30.0)) == 0.02
try:
    cap_learned_wait(-1)
except ValueError as exc:
    assert "max_wait_s" in str(exc)
else:
    raise AssertionError("negative cap accepted")
print("ok")
"""


def test_learned_wait_is_capped_and_the_latency_model_kept():
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=base_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
