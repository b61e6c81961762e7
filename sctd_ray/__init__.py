"""sctd-ray: Ray-distributed model-zoo scanner for selective cross-task distillation.

The method is specified in docs/method.md; the layout in docs/architecture.md.
"""

__version__ = "0.1.0"
