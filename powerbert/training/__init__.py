"""The three-step pipeline (fine-tune, configuration search, re-train) on transformers.Trainer.

Imports the elimination core and ``powerbert.inputs``; nothing is imported here, so
``import powerbert.training.distributed`` loads no torch.
"""
