"""slimopt: memory-lean optimizers for LLM pretraining.

The optimizers need only torch; the harness (``slimopt.train``), the benchmarks and the framework
integrations (``slimopt.integrations``) use optional extras, named in one line when missing.

>>> import torch, slimopt
>>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
>>> opt = slimopt.SAGE(model.parameters(), lr=2e-3)
>>> model(torch.tensor([1, 2])).sum().backward()
>>> opt.step()
"""

from slimopt.memory import state_bytes
from slimopt.optimizer import SAGE, SCALE, AdamW, Lion, SGDSaI, SinkGD, SlimOptimizer
from slimopt.presets import PRESETS, create_optimizer
from slimopt.roles import ROLES, RoleError, param_roles

__all__ = [
    "PRESETS",
    "ROLES",
    "SAGE",
    "SCALE",
    "AdamW",
    "Lion",
    "RoleError",
    "SGDSaI",
    "SinkGD",
    "SlimOptimizer",
    "create_optimizer",
    "param_roles",
    "state_bytes",
]
__version__ = "0.1.0"
