"""Point-BERT in plain PyTorch: point tokenizer (dVAE), masked point modeling, fine-tuning.

Importing the package is cheap; torch and the models load when first used::

    from pointbert.config import preset
    from pointbert.checkpoint import build_model, load_model
"""

__version__ = "0.1.0"
