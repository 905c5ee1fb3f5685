"""slimopt inside other training frameworks; each module imports its framework only when used.

- :mod:`slimopt.integrations.hf`: Hugging Face ``Trainer(optimizer_cls_and_kwargs=...)``.
- :mod:`slimopt.integrations.lightning`: Lightning's ``configure_optimizers``.
- :mod:`slimopt.integrations.torchtitan`: a torchtitan optimizer container, its config and builder.

Hugging Face accelerate needs nothing extra: ``accelerator.prepare(model, optimizer)`` and
``save_state``/``load_state`` work with any slimopt optimizer as they do with torch's.
"""

from __future__ import annotations

__all__: list[str] = []
