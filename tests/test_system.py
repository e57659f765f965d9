import json
import subprocess
import sys

import pytest
import torch

from qatbench.system import training_state_bytes


class _Holder:
    """A method stand-in: an optimizer, and state that shares a parameter's storage."""

    def __init__(self, model):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.model = model

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "again": [self.model.weight.detach()],
                "extra": torch.zeros(5)}

    def memory_tensors(self):
        return [torch.zeros(3, dtype=torch.int32)]


def test_training_state_counts_each_storage_once_by_category():
    model = torch.nn.Linear(3, 2)
    holder = _Holder(model)
    model(torch.ones(1, 3)).sum().backward()
    holder.optimizer.step()  # creates the momentum buffers: 6 + 2 floats
    state = training_state_bytes(model, holder)
    assert state == {"parameters": 8 * 4, "gradients": 8 * 4, "optimizer": 8 * 4, "method": (5 + 3) * 4,
                     "total": (8 + 8 + 8 + 5 + 3) * 4}


def test_cpu_peak_is_reported_as_its_increase_over_the_start():
    # in a fresh process: in this one, freed memory would be reused without raising the resident size
    script = ("import json, torch; from qatbench.system import PeakMemory; m = PeakMemory(torch.device('cpu')); "
              "m.start(); block = torch.ones(64 * 2**20 // 4); block += 1; print(json.dumps(m.read()))")
    reading = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                        check=True).stdout)
    assert reading["peak_rss_mb"] >= reading["baseline_rss_mb"] + 60
    if reading["rss_scope"] != "run":
        pytest.skip("this kernel cannot reset a process's peak RSS mark (/proc/self/clear_refs)")
    assert 60 <= reading["peak_rss_increase_mb"] < 200


def test_a_steps_transient_memory_is_measured_from_the_level_after_the_first_step():
    # in a fresh process: the first step pages in code and allocates the state; a later step allocates 64 MB
    # of temporaries. The increase over the start counts both, the increase over the settled level only those.
    script = ("import json, torch; from qatbench.system import PeakMemory; m = PeakMemory(torch.device('cpu')); "
              "m.start(); state = torch.ones(96 * 2**20 // 4); state += 1; m.settle(); "
              "block = torch.ones(64 * 2**20 // 4); block += 1; del block; m.settle(); print(json.dumps(m.read()))")
    reading = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                        check=True).stdout)
    if reading["rss_scope"] != "run":
        pytest.skip("this kernel cannot reset a process's peak RSS mark (/proc/self/clear_refs)")
    assert 150 <= reading["peak_rss_increase_mb"] < 300
    assert 60 <= reading["step_rss_increase_mb"] < 90
