"""torchtitan 0.3's own ``torchtitan.train`` on CPU, for the integration tests (run under torchrun
with gloo; same arguments as ``python -m torchtitan.train``).

torchtitan 0.3 picks its device when ``torchtitan.tools.utils`` is imported and falls back to
CUDA when no accelerator is found, so on a CPU-only torch its ``Trainer`` stops at
``torch.cuda.set_device`` (``module 'torch._C' has no attribute '_cuda_setDevice'``). This
launcher sets that module's device to ``cpu`` (with a stand-in for the few device-module calls
the trainer makes) before anything else of torchtitan is imported, then runs torchtitan's
``main()`` unchanged. Three more gaps are bridged below: gloo has no PREMUL_SUM reduce-scatter, torch 2.13 has
no ``torch.distributed.set_timeout``, and
FlexAttention has no backward on CPU (``llama3_debugmodel_sdpa`` uses torchtitan's SDPA attention).
"""

import types

import torch
import torchtitan.tools.utils as tt_utils
from torch.distributed.fsdp import FSDPModule


def _cpu_device_module() -> types.SimpleNamespace:
    props = types.SimpleNamespace(total_memory=1 << 40, name="cpu")
    return types.SimpleNamespace(
        set_device=lambda device: None,
        current_device=lambda: 0,
        device_count=lambda: 1,
        get_device_name=lambda device=None: "cpu",
        get_device_properties=lambda device=None: props,
        reset_peak_memory_stats=lambda: None,
        empty_cache=lambda: None,
        memory_stats=lambda device=None: {},
        synchronize=lambda: None,
        is_available=lambda: True,
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
    )


tt_utils.device_type = "cpu"
tt_utils.device_module = _cpu_device_module()

# torchtitan sets FSDP's gradient divide factor to 1 (it scales by the global token count), which
# FSDP turns into a PREMUL_SUM reduce-scatter that gloo lacks; a plain SUM is the same reduction.
_set_factor = FSDPModule.set_gradient_divide_factor


def _set_factor_sum_comms(self, factor):
    _set_factor(self, factor)
    self.set_force_sum_reduction_for_comms(True)


FSDPModule.set_gradient_divide_factor = _set_factor_sum_comms

# after the first step torchtitan shortens the process-group timeouts with
# torch.distributed.set_timeout, which torch 2.13 does not have; the timeouts stay as they are.
if not hasattr(torch.distributed, "set_timeout"):
    import torchtitan.distributed.utils as tt_dist_utils

    tt_dist_utils.set_pg_timeouts = lambda *args, **kwargs: None


def llama3_debugmodel_sdpa():
    """``--module __main__ --config llama3_debugmodel_sdpa``: torchtitan's llama3 debug model with
    the slimopt optimizer, its FlexAttention (no backward on CPU) replaced by torchtitan's causal
    SDPA attention."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    from slimopt.integrations.torchtitan import llama3_debugmodel

    config = llama3_debugmodel()
    for _, _, parent, attr in list(config.model_spec.model.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return config


if __name__ == "__main__":
    from torchtitan.train import main

    main()
